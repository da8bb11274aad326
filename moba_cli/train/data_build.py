"""Build a dataset folder from a :class:`~moba_cli.train.data_config.DataConfig` (``moba data build``).

Layout of DATA (read by :class:`moba_cli.train.data.TokenDataset`):

- ``tokenizer/``: transformers tokenizer (byte-level BPE; bos, eos, pad);
- ``{split}.tokens``: little-endian token ids (uint16 when the vocabulary fits, else uint32), the split's
  documents one after the other, each ``[bos] + tokens + [eos]``;
- ``{split}.docs.npy``: int64 ``[n_docs + 1]`` document start offsets (last entry: the token count);
- ``{split}.mask``: uint8 per token, 1 where it counts in the loss (only when a source gives SFT pairs);
- ``manifest.json``: schema ``moba-data/1``, counts, per-source statistics, the build config,
  ``files_hash`` (SHA-256 over every data file: the same tokens give the same hash on any machine) and
  ``manifest_hash`` (over the manifest itself).

Everything is written into a hidden ``.NAME.partial-*`` folder beside DATA and renamed at the end, so an
interrupted build never leaves a folder that looks complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from moba_cli.errors import MobaError
from moba_cli.train.data import SCHEMA, read_manifest
from moba_cli.train.data_config import (
    CodeSource,
    DataConfig,
    SyntheticSource,
    config_from_dict,
    mixture_weights,
    validate,
)
from moba_cli.train.data_sources import Doc, Listing, SourceStats, code_files, iter_source
from moba_cli.train.data_synth import CountMany, chars_estimate
from moba_cli.train.data_tokenizer import BOS, EOS, PAD, reuse_tokenizer, save_tokenizer, train_tokenizer

SPLITS = ("train", "val")
Progress = Callable[[str, int, int | None], None]
"""``progress(phase, done, total)``: phase ``"tokenizer"`` counts bytes, ``"tokens"`` counts tokens."""

_ENCODE_BATCH = 64  # documents encoded together (tokenizers runs a batch on all cores)


class _Mixer:
    """Deals documents from the sources so each source's share of tokens follows its weight.

    The next document comes from the source furthest below its share. Shares count the tokens the
    consumer has reported (:meth:`record`) plus an estimate for documents dealt but not yet encoded (their
    characters times the source's tokens per character so far). The mixture ends when every bounded source
    is used up (if all are unbounded, never: the caller stops at ``max_tokens``).
    """

    def __init__(self, streams: list[Iterator[Doc]], weights: list[float], bounded: list[bool]) -> None:
        self.streams, self.weights, self.bounded = streams, weights, bounded
        n = len(streams)
        self.tokens, self.chars, self.pending = [0] * n, [0] * n, [0] * n
        self.alive = [True] * n
        self.dealt = 0

    def _share(self, i: int) -> float:
        rate = self.tokens[i] / self.chars[i] if self.chars[i] else 0.3
        return (self.tokens[i] + rate * self.pending[i]) / self.weights[i]

    def record(self, i: int, chars: int, tokens: int) -> None:
        """A document of source ``i`` dealt earlier turned out ``tokens`` tokens long."""
        self.pending[i] -= chars
        self.chars[i] += chars
        self.tokens[i] += tokens

    def __iter__(self) -> Iterator[tuple[int, Doc]]:
        while True:
            if any(self.bounded) and not any(a and b for a, b in zip(self.alive, self.bounded, strict=True)):
                return
            live = [i for i, a in enumerate(self.alive) if a]
            if not live:
                return
            i = min(live, key=lambda j: (self._share(j), j))
            doc = next(self.streams[i], None)
            if doc is None:
                self.alive[i] = False
                continue
            self.pending[i] += len(doc.text) + len(doc.answer or "")
            self.dealt += 1
            yield i, doc


def _mixture(cfg: DataConfig, count: CountMany, listings: dict[int, Listing] | None = None
             ) -> tuple[_Mixer, list[SourceStats]]:
    stats = [SourceStats() for _ in cfg.sources]
    listings = listings or {}
    streams = [iter_source(s, i, cfg.seed, count, stats[i], listings.get(i)) for i, s in enumerate(cfg.sources)]
    bounded = [not (isinstance(s, SyntheticSource) and s.docs is None) for s in cfg.sources]
    weights = [max(w, 1e-9) for w in mixture_weights(cfg)]
    return _Mixer(streams, weights, bounded), stats


def _in_val(doc: Doc, seed: int, val_fraction: float) -> bool:
    """The split is a hash of the document and the seed: the same document always lands on the same side."""
    key = seed.to_bytes(8, "little", signed=True)
    return _unit_hash(doc.text + "\0" + (doc.answer or ""), key) < val_fraction


class _SplitWriter:
    """Appends documents to one split's files, hashing the bytes as they go."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, with_mask: bool) -> None:
        self.folder, self.split, self.dtype = folder, split, dtype
        self.tokens = (folder / f"{split}.tokens").open("wb")
        self.mask = (folder / f"{split}.mask").open("wb") if with_mask else None
        self.hash_tokens, self.hash_mask = hashlib.sha256(), hashlib.sha256()
        self.starts = [0]

    def add(self, ids: np.ndarray, mask: np.ndarray | None) -> None:
        data = ids.astype(self.dtype).tobytes()
        self.tokens.write(data)
        self.hash_tokens.update(data)
        if self.mask is not None:
            m = (mask if mask is not None else np.ones(len(ids), np.uint8)).tobytes()
            self.mask.write(m)
            self.hash_mask.update(m)
        self.starts.append(self.starts[-1] + len(ids))

    def close(self) -> dict[str, str]:
        """Close the files, write the document offsets; returns each file's SHA-256."""
        self.tokens.close()
        hashes = {f"{self.split}.tokens": self.hash_tokens.hexdigest()}
        if self.mask is not None:
            self.mask.close()
            hashes[f"{self.split}.mask"] = self.hash_mask.hexdigest()
        docs = self.folder / f"{self.split}.docs.npy"
        np.save(docs, np.asarray(self.starts, dtype=np.int64))
        hashes[docs.name] = hashlib.sha256(np.asarray(self.starts, dtype="<i8").tobytes()).hexdigest()
        return hashes


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MobaError(f"{out} is a file; give a folder for the dataset")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise MobaError(f"{out} already exists and is not empty; choose another folder or pass --overwrite")
        if not (out / "manifest.json").is_file():
            raise MobaError(f"{out} is not a dataset built by moba (no manifest.json); refusing to replace it")
        read_manifest(out)  # replaces only what a build made


def tokenizer_sample(cfg: DataConfig, progress: Progress | None = None,
                     listings: dict[int, Listing] | None = None) -> Iterator[str]:
    """The texts that train the tokenizer: about ``tokenizer_bytes`` spread over the whole corpus.

    With ``max_tokens`` the corpus is about ``4 * max_tokens`` characters; a document is taken when a hash
    of it falls below ``tokenizer_bytes`` over that, so a large corpus is sampled evenly rather than by its
    first packages. Without ``max_tokens`` the first ``tokenizer_bytes`` are taken.
    """
    mixer, _ = _mixture(cfg, chars_estimate, listings)
    budget = cfg.tokenizer_bytes
    approx = None if cfg.max_tokens is None else cfg.max_tokens * 4  # chars_estimate's 4 characters a token
    rate = 1.0 if approx is None else min(1.0, budget / approx)
    seen = taken = 0
    for _, doc in mixer:
        text = doc.text + (doc.answer or "")
        seen += len(text)
        if rate >= 1.0 or _unit_hash(text, b"tokenizer") < rate:
            taken += len(text)
            yield text
        if progress:
            progress("tokenizer", min(taken, budget), budget)
        if taken >= budget or (approx is not None and seen >= approx):
            return


def _train_tokenizer(cfg: DataConfig, progress: Progress | None, listings: dict[int, Listing]) -> Any:
    texts = tokenizer_sample(cfg, progress, listings)
    first = next(texts, None)
    if first is None:
        raise MobaError("the sources gave no documents (empty corpus); check the paths, include lists and sizes")
    return train_tokenizer(itertools.chain([first], texts), cfg.vocab_size)


def _unit_hash(text: str, key: bytes) -> float:
    """A number in [0, 1) from ``text`` alone (the same on every machine and run)."""
    h = hashlib.blake2b(text.encode(), digest_size=8, key=key)
    return int.from_bytes(h.digest(), "little") / 2.0**64


def build_dataset(cfg: DataConfig | dict[str, Any], out: str | Path | None = None, overwrite: bool = False,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Build the dataset described by ``cfg`` (or a recipe's ``data.build`` mapping) into ``out`` (default
    ``cfg.out``); returns its manifest, plus the build's ``seconds`` under ``build`` (not in the file).
    """
    if isinstance(cfg, dict):
        cfg = config_from_dict(cfg)
    validate(cfg)
    if out is None:
        if cfg.out is None:
            raise MobaError("no output folder: give --out DATA (or 'out' in the data config)")
        out = cfg.out
    out = Path(out)
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    start = time.perf_counter()
    try:
        manifest = _build_into(cfg, tmp, progress)
        manifest["build"] = {"seconds": round(time.perf_counter() - start, 3)}
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _remove_stale_partials(out: Path) -> None:
    """Remove the hidden partial folders of builds of ``out`` that were killed (their process is gone)."""
    for p in out.parent.glob(f".{out.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass  # alive (or not ours to signal): leave it


def _replace(tmp: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _build_into(cfg: DataConfig, folder: Path, progress: Progress | None) -> dict[str, Any]:
    listings = {i: code_files(s) for i, s in enumerate(cfg.sources) if isinstance(s, CodeSource)}  # list once
    if cfg.tokenizer is not None:
        tok, special = reuse_tokenizer(cfg.tokenizer, folder / "tokenizer")
    else:
        tok = _train_tokenizer(cfg, progress, listings)
        save_tokenizer(tok, folder / "tokenizer")
        special = {"bos": tok.token_to_id(BOS), "eos": tok.token_to_id(EOS), "pad": tok.token_to_id(PAD)}
    vocab = tok.get_vocab_size()
    dtype = np.dtype("<u2") if vocab <= 1 << 16 else np.dtype("<u4")
    bos, eos = special["bos"], special["eos"]

    def count(pieces: list[str]) -> list[int]:
        return [len(e.ids) for e in tok.encode_batch(pieces, add_special_tokens=False)]

    mixer, stats = _mixture(cfg, count, listings)
    with_mask = any(getattr(s, "sft", False) or getattr(s, "answer_field", None) for s in cfg.sources)
    writers = {s: _SplitWriter(folder, s, dtype, with_mask) for s in SPLITS}
    kept = [{"docs": 0, "tokens": 0, "bytes": 0} for _ in cfg.sources]
    content = [hashlib.sha256() for _ in cfg.sources]
    total = 0
    stream = iter(mixer)
    while cfg.max_tokens is None or total < cfg.max_tokens:
        # small batches first, so the mixer learns each source's tokens per character before dealing many
        size = min(_ENCODE_BATCH, 1 + mixer.dealt)
        batch = [item for _, item in zip(range(size), stream, strict=False)]
        if not batch:
            break
        texts = [d.text for _, d in batch] + [d.answer or "" for _, d in batch]
        enc = tok.encode_batch(texts, add_special_tokens=False)
        for k, (src, doc) in enumerate(batch):
            prompt, answer = enc[k].ids, enc[len(batch) + k].ids
            ids = np.array([bos, *prompt, *answer, eos], dtype=np.int64)
            mask = None
            if doc.answer is not None:
                mask = np.zeros(len(ids), np.uint8)
                mask[1 + len(prompt):] = 1  # the answer and the eos after it
            split = "val" if _in_val(doc, cfg.seed, cfg.val_fraction) else "train"
            writers[split].add(ids, mask)
            nbytes = len(doc.text.encode()) + len((doc.answer or "").encode())
            kept[src]["docs"] += 1
            kept[src]["tokens"] += len(ids)
            kept[src]["bytes"] += nbytes
            mixer.record(src, len(doc.text) + len(doc.answer or ""), len(ids))
            content[src].update(f"{doc.name}\0{len(doc.text)}\0".encode() + doc.text.encode()
                                + (doc.answer or "").encode())
            total += len(ids)
            if progress:
                progress("tokens", total, cfg.max_tokens)
            if cfg.max_tokens is not None and total >= cfg.max_tokens:
                break
    hashes: dict[str, str] = {}
    for w in writers.values():
        hashes.update(w.close())
    splits = {s: {"tokens": w.starts[-1], "docs": len(w.starts) - 1} for s, w in writers.items()}
    if splits["train"]["docs"] + splits["val"]["docs"] == 0:
        raise MobaError("the sources gave no documents (empty corpus); check the paths, include lists and sizes")
    if splits["train"]["docs"] == 0:
        raise MobaError(f"the training split is empty ({splits['val']['docs']} documents, all in validation); "
                        "lower val_fraction or add documents")
    if cfg.val_fraction > 0 and splits["val"]["docs"] == 0:
        raise MobaError(f"the validation split is empty ({splits['train']['docs']} documents, val_fraction "
                        f"{cfg.val_fraction:g}); raise val_fraction or add documents")
    hashes["tokenizer/tokenizer.json"] = hashlib.sha256((folder / "tokenizer" / "tokenizer.json").read_bytes()
                                                        ).hexdigest()
    files_hash = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
    sources = [
        {"kind": s.kind, **kept[i], "skipped": stats[i].skipped, "content_hash": content[i].hexdigest()}
        for i, s in enumerate(cfg.sources)
    ]
    manifest: dict[str, Any] = {
        "schema": SCHEMA,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "special_tokens": special,
        "loss_mask": with_mask,
        "sources": sources,
        "files": hashes,
        "files_hash": files_hash,
        "splits": splits,
        "config": cfg.to_dict(),
    }
    manifest["manifest_hash"] = manifest_hash(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def manifest_hash(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON, leaving out the hash itself and the build timings."""
    body = {k: v for k, v in manifest.items() if k not in ("manifest_hash", "build")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

