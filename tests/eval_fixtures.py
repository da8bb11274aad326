"""Tiny checkpoints with locally trained tokenizers for the eval tests (nothing downloaded)."""

from __future__ import annotations

import string
from pathlib import Path

from hf_tiny import save_random_checkpoint, tiny_config

VOCAB = 512
_TEXT = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards. One of the special magic numbers for quiet-river is: 1234567. "
    "What is the special magic number for amber-anchor mentioned in the provided text? "
    "def main(argv): return sorted(set(argv)) if argv else None  # code 0123456789\n"
)


def bpe_tokenizer():
    """A byte-level BPE (with a BOS token) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_TEXT] * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def char_tokenizer():
    """One token per character (no special tokens): a tokenizer unlike BPE for placement tests."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable))
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def tiny_checkpoint(path: Path, tokenizer: str = "bpe", *, moba: dict | None = None, seed: int = 0) -> Path:
    """A random tiny Llama with a tokenizer saved beside it; ``moba`` settings go into config.json."""
    cfg = tiny_config("llama", vocab=VOCAB, layers=2, max_positions=1024)
    if moba is not None:
        cfg.moba = {"version": 1, "backend": "naive", **moba}  # not the Triton interpreter: too slow
    save_random_checkpoint(path, cfg, seed=seed)
    (bpe_tokenizer() if tokenizer == "bpe" else char_tokenizer()).save_pretrained(path)
    return path
