"""The dataset's tokenizer: a byte-level BPE trained locally with ``tokenizers``, saved for transformers."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moba_cli.errors import MobaError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIALS = (BOS, EOS, PAD)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``vocab_size`` entries (bos, eos, pad first).

    Every byte is in the alphabet, so any text encodes without unknown tokens. Encoding with special
    tokens puts bos in front (no eos: a prompt goes on); the build itself adds bos and eos around documents.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # training documents start with bos, so text encoded later for evaluation (tok(text)) starts with it too
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos)])
    return tok


def save_tokenizer(tok: Any, folder: Path) -> None:
    """Save as a transformers ``PreTrainedTokenizerFast`` (bos, eos and pad set) in ``folder``."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.save_pretrained(str(folder))


def find_tokenizer(path: str | Path) -> Path:
    """The tokenizer folder given either as itself or as a dataset folder holding ``tokenizer/``."""
    p = Path(path)
    if (p / "tokenizer" / "tokenizer.json").is_file():
        return p / "tokenizer"
    if (p / "tokenizer.json").is_file():
        return p
    raise MobaError(f"no tokenizer at {path} (expected tokenizer.json there or in {p / 'tokenizer'})")


def reuse_tokenizer(path: str | Path, folder: Path) -> tuple[Any, dict[str, int]]:
    """Copy a tokenizer to ``folder`` for a new dataset; returns it and its bos/eos/pad ids.

    Any transformers fast tokenizer with bos and eos works (a checkpoint's own, for continued pre-training);
    one without a pad token gets eos as pad, as the data contract asks for all three.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    src = find_tokenizer(path)
    try:
        fast = PreTrainedTokenizerFast.from_pretrained(str(src))
    except (OSError, ValueError) as e:
        raise MobaError(f"cannot load the tokenizer at {src}: {e}") from None
    if fast.bos_token is None or fast.eos_token is None:
        raise MobaError(f"the tokenizer at {src} has no {'bos' if fast.bos_token is None else 'eos'} token; "
                        "documents are stored as [bos] + text + [eos]")
    if fast.pad_token is None:
        fast.pad_token = fast.eos_token
    fast.save_pretrained(str(folder))
    ids = {"bos": fast.bos_token_id, "eos": fast.eos_token_id, "pad": fast.pad_token_id}
    return Tokenizer.from_file(str(folder / "tokenizer.json")), ids
