"""Tiny training data for the train tests, written directly in the `moba data build` layout (fast: no
corpus reading), so loop tests do not depend on the builder's sources.

``make_data_dir`` writes a data folder (tokenizer/, *.tokens, *.docs.npy, optional *.mask, manifest.json)
per the data contract (/work/brief/data-interface.md).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

WORDS = ("alpha beta gamma delta key value lookup find the number passkey is remember it later and then "
         "some more text with words that repeat so the tokenizer learns merges").split()


def _tokenizer(root: Path, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(root / "tokenizer")
    return fast


def make_data_dir(root: str | Path, *, n_docs: int = 60, seed: int = 0, vocab: int = 300, sft: bool = False) -> Path:
    """A data folder of ``n_docs`` random-word documents of odd lengths (val gets a fifth as many)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(root, vocab)
    rng = random.Random(seed)
    splits = {}
    for split, n in (("train", n_docs), ("val", max(4, n_docs // 5))):
        ids: list[int] = []
        mask: list[int] = []
        starts = [0]
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 60))]
            body = tok(" ".join(words), add_special_tokens=False)["input_ids"]
            doc = [tok.bos_token_id, *body, tok.eos_token_id]
            ids.extend(doc)
            answer_from = len(doc) // 2
            mask.extend([0] * answer_from + [1] * (len(doc) - answer_from))
            starts.append(len(ids))
        np.asarray(ids, dtype=np.uint16).tofile(root / f"{split}.tokens")
        np.save(root / f"{split}.docs.npy", np.asarray(starts, dtype=np.int64))
        if sft:
            np.asarray(mask, dtype=np.uint8).tofile(root / f"{split}.mask")
        splits[split] = {"tokens": len(ids), "docs": n}
    manifest = {"schema": "moba-data/1", "dtype": "uint16", "vocab_size": len(tok), "sources": ["test"],
                "files_hash": "test", "manifest_hash": f"test-{seed}", "splits": splits, "config": {}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root
