"""Tiny training data for the train tests, written locally in the `moba data build` layout.

``make_data_dir`` writes a data folder (tokenizer/, *.tokens, *.docs.npy, optional *.mask, manifest.json)
per the data contract. When ``moba_cli.train.data`` (the real loader) is not in this tree yet,
``install_stub`` puts a minimal module obeying the same interface in its place.
"""

from __future__ import annotations

import json
import random
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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


# --------------------------------------------------------------------------------------------- stand-in loader


class TokenDataset:
    def __init__(self, root, split: str = "train"):
        self.root = Path(root)
        info = json.loads((self.root / "manifest.json").read_text())
        self.vocab_size = int(info["vocab_size"])
        self.tokens = np.memmap(self.root / f"{split}.tokens", dtype=np.uint16, mode="r")
        self.doc_starts = np.load(self.root / f"{split}.docs.npy")
        mask = self.root / f"{split}.mask"
        self.loss_mask = np.memmap(mask, dtype=np.uint8, mode="r") if mask.is_file() else None

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.root / "tokenizer")


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    doc_lens: list[list[int]]


class PackedLoader:
    """Rows are consecutive S-token windows; an epoch shuffles the windows; ranks share a global order."""

    def __init__(self, ds, seq_len, batch_size, seed, rank=0, world_size=1, pack="documents"):
        self.ds, self.seq_len, self.batch_size, self.seed = ds, seq_len, batch_size, seed
        self.rank, self.world = rank, world_size
        self.windows = len(ds.tokens) // seq_len
        self.cursor = 0  # global batches (of batch_size * world rows) consumed

    def _row(self, w: int):
        lo, hi = w * self.seq_len, (w + 1) * self.seq_len
        ids = torch.from_numpy(np.asarray(self.ds.tokens[lo:hi], dtype=np.int64))
        cuts = [c for c in self.ds.doc_starts.tolist() if lo < c < hi]
        edges = [lo, *cuts, hi]
        lens = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
        pos = torch.cat([torch.arange(n) for n in lens])
        labels = ids.clone()
        if self.ds.loss_mask is not None:
            labels[torch.from_numpy(np.asarray(self.ds.loss_mask[lo:hi]) == 0)] = -100
        return ids, labels, pos, lens

    def __iter__(self) -> Iterator[Batch]:
        while True:
            per = self.batch_size * self.world
            start = self.cursor * per
            rows = []
            for k in range(start + self.rank * self.batch_size, start + (self.rank + 1) * self.batch_size):
                epoch, i = divmod(k, self.windows)
                order = np.random.default_rng(self.seed + epoch).permutation(self.windows)
                rows.append(self._row(int(order[i])))
            self.cursor += 1
            yield Batch(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
                        torch.stack([r[2] for r in rows]), [r[3] for r in rows])

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])


def install_stub() -> None:
    """Make ``moba_cli.train.data`` importable: the real module when present, else this stand-in."""
    try:
        import moba_cli.train.data  # noqa: F401
    except ImportError:
        mod = types.ModuleType("moba_cli.train.data")
        mod.TokenDataset, mod.Batch, mod.PackedLoader = TokenDataset, Batch, PackedLoader
        sys.modules["moba_cli.train.data"] = mod
