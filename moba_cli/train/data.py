"""Read a built dataset (``moba data build``) and cut it into packed, document-masked training batches.

The on-disk layout is described in :mod:`moba_cli.train.data_build`; in short a split is a flat token file
(documents ``[bos] + tokens + [eos]`` one after the other), the document start offsets, and for SFT data a
loss mask. :class:`PackedLoader` cuts the split into windows of ``seq_len`` consecutive tokens, shuffles the
windows per epoch from a seed, and hands out global batches that every rank slices the same way, so the
order depends only on (seed, seq_len, packing, global batch) and never on the GPU count.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moba_cli.errors import MobaError

SCHEMA = "moba-data/1"
IGNORE_INDEX = -100  # transformers' cross-entropy skips these labels
_STATE_VERSION = 1
PACKINGS = ("documents", "whole")


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The ``manifest.json`` of a built dataset; a clear error when ``root`` is not one."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise MobaError(f"{root} is not a built dataset (no manifest.json); make one with `moba data build`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MobaError(f"cannot read {path}: {e}") from None
    if manifest.get("schema") != SCHEMA:
        raise MobaError(f"{path} has schema {manifest.get('schema')!r}, expected {SCHEMA!r}")
    return manifest


class TokenDataset:
    """One split of a built dataset, memory-mapped (nothing is read until a window is asked for).

    Attributes: ``tokens`` uint16/uint32 memmap ``[N]``; ``doc_starts`` int64 ``[n_docs + 1]`` (the last
    entry is N); ``loss_mask`` uint8 memmap ``[N]`` or None (pretraining data: every token counts);
    ``vocab_size``; ``manifest`` (the parsed manifest.json).
    """

    def __init__(self, root: str | Path, split: str = "train") -> None:
        self.root = Path(root)
        self.split = split
        self.manifest = read_manifest(self.root)
        splits = self.manifest.get("splits", {})
        if split not in splits:
            raise MobaError(f"{root} has no split {split!r}; it has {', '.join(sorted(splits)) or 'none'}")
        self.vocab_size = int(self.manifest["vocab_size"])
        dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        n_tokens = int(splits[split]["tokens"])
        tok_path = self.root / f"{split}.tokens"
        if not tok_path.is_file() or tok_path.stat().st_size != n_tokens * dtype.itemsize:
            raise MobaError(f"{tok_path} is missing or not {n_tokens} tokens long; rebuild the dataset")
        self.tokens: np.ndarray = (
            np.memmap(tok_path, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
        )
        self.doc_starts: np.ndarray = np.load(self.root / f"{split}.docs.npy").astype(np.int64, copy=False)
        if self.doc_starts.ndim != 1 or len(self.doc_starts) < 1 or int(self.doc_starts[-1]) != n_tokens:
            raise MobaError(f"{self.root / f'{split}.docs.npy'} does not match {tok_path}; rebuild the dataset")
        mask_path = self.root / f"{split}.mask"
        self.loss_mask: np.ndarray | None = None
        if mask_path.is_file():
            self.loss_mask = np.memmap(mask_path, dtype=np.uint8, mode="r", shape=(n_tokens,)) if n_tokens else (
                np.zeros(0, np.uint8))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_docs(self) -> int:
        return len(self.doc_starts) - 1

    def doc(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (with its bos and eos)."""
        return np.asarray(self.tokens[self.doc_starts[i]: self.doc_starts[i + 1]])

    def tokenizer(self) -> Any:
        """The dataset's tokenizer (``PreTrainedTokenizerFast`` from ``tokenizer/``)."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(self.root / "tokenizer"))


@dataclass
class Batch:
    """A packed batch: ``B`` rows of ``S`` tokens, each row one or more document pieces.

    ``labels`` equal ``input_ids`` (transformers shifts them inside the model) except -100 where a token is
    outside the loss: the SFT prompt, and the first token of each document piece, which would otherwise be
    predicted from a different document.
    """

    input_ids: torch.Tensor  # int64 [B, S]
    labels: torch.Tensor  # int64 [B, S]
    position_ids: torch.Tensor  # int64 [B, S], 0 at each document piece's first token
    doc_lens: list[list[int]]  # per row, lengths of its document pieces (sum == S)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.position_ids.to(device, non_blocking=non_blocking),
            self.doc_lens,
        )

    def cu_seqlens(self) -> torch.Tensor:
        """int32 ``[n_pieces + 1]`` offsets of the document pieces in the flattened ``[B * S]`` batch."""
        lens = [n for row in self.doc_lens for n in row]
        return torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)


def window_starts(doc_starts: np.ndarray, seq_len: int, pack: str) -> np.ndarray:
    """Token offsets of the rows (each ``seq_len`` consecutive tokens) for a packing mode.

    ``documents``: back-to-back windows ``0, S, 2S, ...``: every token once an epoch; a document may be cut
    between two rows. ``whole``: each row starts at a document start (or ``S`` tokens into a document
    longer than ``S``) and runs on into the following documents; the next row starts at the document the
    previous one cut, so every document of at most ``S`` tokens is whole in one row (the cut head at a
    row's end is also trained on: tokens there count twice an epoch). For retrieval documents whose
    question must see its answer's context.
    """
    n = int(doc_starts[-1])
    if pack == "documents":
        return np.arange(n // seq_len, dtype=np.int64) * seq_len
    out: list[int] = []
    cur = 0
    while cur + seq_len <= n:
        out.append(cur)
        end = cur + seq_len
        # the last document start in (cur, end]: the document this row cut (or the one starting right after)
        j = int(np.searchsorted(doc_starts, end, side="right")) - 1
        cur = int(doc_starts[j]) if doc_starts[j] > cur else end
    return np.asarray(out, dtype=np.int64)


class PackedLoader:
    """Deterministic, resumable batches of ``seq_len``-token windows cut from a :class:`TokenDataset`.

    The split is cut into windows of ``seq_len`` consecutive tokens (see :func:`window_starts` for the
    ``documents`` and ``whole`` packings; the tail shorter than a window is left out). Each epoch shuffles
    the windows from ``(seed, epoch)`` (``shuffle=False`` keeps corpus order) and deals them out in global batches of
    ``batch_size * world_size`` rows; rank ``r`` takes rows ``[r * batch_size, (r + 1) * batch_size)``.
    An epoch's last incomplete global batch is skipped. ``epochs=None`` repeats forever (training);
    ``epochs=1`` makes one pass (validation).
    """

    def __init__(
        self,
        ds: TokenDataset,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pack: str = "documents",
        *,
        shuffle: bool = True,
        epochs: int | None = None,
    ) -> None:
        if pack not in PACKINGS:
            raise MobaError(f"unknown packing {pack!r}; choose {' or '.join(PACKINGS)}")
        if seq_len < 1 or batch_size < 1 or world_size < 1:
            raise MobaError("seq_len, batch_size and world_size must be positive")
        if not 0 <= rank < world_size:
            raise MobaError(f"rank {rank} is outside world_size {world_size}")
        self.ds = ds
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epochs = epochs
        self.global_batch = batch_size * world_size
        self.pack = pack
        self.window_starts = window_starts(ds.doc_starts, seq_len, pack)
        self.n_windows = len(self.window_starts)
        if self.n_windows < self.global_batch:
            raise MobaError(
                f"the {ds.split} split has {len(ds)} tokens: {self.n_windows} windows of {seq_len}, fewer than one "
                f"global batch of {self.global_batch} rows; build more data or lower the batch or sequence length"
            )
        self.steps_per_epoch = self.n_windows // self.global_batch
        self.epoch = 0
        self.step_in_epoch = 0
        self._order: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.steps_per_epoch

    def window_order(self, epoch: int) -> np.ndarray:
        """Window indices of ``epoch`` in the order they are dealt (the same on every rank)."""
        if not self.shuffle:
            return np.arange(self.n_windows, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def __iter__(self) -> Iterator[Batch]:
        """Batches from the current position on. A finished finite loader starts over from epoch 0."""
        if self.epochs is not None and self.epoch >= self.epochs:
            self.epoch, self.step_in_epoch = 0, 0
        while self.epochs is None or self.epoch < self.epochs:
            if self._order[0] != self.epoch:
                self._order = (self.epoch, self.window_order(self.epoch))
            order = self._order[1]
            while self.step_in_epoch < self.steps_per_epoch:
                first = self.step_in_epoch * self.global_batch + self.rank * self.batch_size
                windows = order[first: first + self.batch_size]
                # advance before yielding: a state_dict taken after this batch resumes at the next one
                self.step_in_epoch += 1
                yield self.make_batch(windows)
            self.epoch += 1
            self.step_in_epoch = 0

    def make_batch(self, windows: np.ndarray) -> Batch:
        """The batch made of the given window indices (one row each)."""
        s = self.seq_len
        ids = np.empty((len(windows), s), dtype=np.int64)
        labels = np.empty((len(windows), s), dtype=np.int64)
        pos = np.empty((len(windows), s), dtype=np.int64)
        doc_lens: list[list[int]] = []
        starts = self.ds.doc_starts
        for row, w in enumerate(windows):
            lo = int(self.window_starts[w])
            hi = lo + s
            ids[row] = self.ds.tokens[lo:hi]
            # document starts strictly inside the window, plus the window's own start
            inner = starts[np.searchsorted(starts, lo, side="right"): np.searchsorted(starts, hi, side="left")]
            cuts = np.concatenate([[lo], inner, [hi]]) - lo
            lens = np.diff(cuts)
            doc_lens.append([int(n) for n in lens])
            piece_start = np.repeat(cuts[:-1], lens)
            pos[row] = np.arange(s) - piece_start
            lab = ids[row].copy()
            if self.ds.loss_mask is not None:
                lab[np.asarray(self.ds.loss_mask[lo:hi]) == 0] = IGNORE_INDEX
            lab[cuts[:-1]] = IGNORE_INDEX
            labels[row] = lab
        return Batch(torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(pos), doc_lens)

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch comes from; ``load_state_dict`` on a new loader resumes there exactly."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "n_windows": self.n_windows,
            "shuffle": self.shuffle,
            "pack": self.pack,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`. The world size may differ if the global batch is the same."""
        if state.get("version") != _STATE_VERSION:
            raise MobaError(f"data loader state version {state.get('version')!r} is not {_STATE_VERSION}")
        mine = self.state_dict()
        for key in ("seed", "seq_len", "global_batch", "pack", "shuffle", "n_windows"):
            if state[key] != mine[key]:
                raise MobaError(
                    f"cannot resume the data order: the saved {key} is {state[key]!r}, this run has {mine[key]!r}"
                )
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
