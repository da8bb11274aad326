"""Documents from each kind of source, in a deterministic order (see :mod:`moba_cli.train.data_config`)."""

from __future__ import annotations

import fnmatch
import json
import os
import site
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moba_cli.errors import MobaError
from moba_cli.train.data_config import CodeSource, FilesSource, Source, SyntheticSource
from moba_cli.train.data_synth import CountMany, make_document

TEXT_SUFFIXES = (".txt", ".md", ".rst")
FILE_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")


@dataclass(frozen=True)
class Doc:
    """One document: ``text`` (the prompt when ``answer`` is set: an SFT pair, loss on the answer only)."""

    text: str
    answer: str | None = None
    name: str = ""


@dataclass
class SourceStats:
    """What was read from a source (for the manifest and the summary table)."""

    docs: int = 0
    bytes: int = 0
    skipped: int = 0  # files that were empty, too large or not UTF-8


def site_roots() -> list[Path]:
    """This interpreter's site-packages folders, without duplicates."""
    found = [sysconfig.get_paths().get(k) for k in ("purelib", "platlib")]
    found += list(getattr(site, "getsitepackages", lambda: [])())
    out: list[Path] = []
    for p in found:
        if p and Path(p).is_dir() and Path(p).resolve() not in [q.resolve() for q in out]:
            out.append(Path(p))
    return out


def _package_name(entry: Path) -> str:
    return entry.name[: -len(entry.suffix)] if entry.is_file() else entry.name


def _wanted(name: str, src: CodeSource) -> bool:
    # editable-install finders hold machine-specific paths: they would make two machines' corpora differ
    if name.startswith((".", "__editable__", "__pycache__")) or name.endswith((".dist-info", ".egg-info")):
        return False
    if src.include and not any(fnmatch.fnmatch(name, pat) for pat in src.include):
        return False
    return not any(fnmatch.fnmatch(name, pat) for pat in src.exclude)


def code_files(src: CodeSource) -> list[tuple[str, Path]]:
    """``(relative name, path)`` of every matching file, sorted by name (first root wins a tie)."""
    roots = [Path(r) for r in src.roots] if src.roots else site_roots()
    for r in roots:
        if not r.is_dir():
            raise MobaError(f"code source root {r} is not a folder")
    suffixes = tuple(src.suffixes)
    files: dict[str, Path] = {}
    for root in roots:
        for entry in sorted(root.iterdir()):
            if not _wanted(_package_name(entry), src):
                continue
            if entry.is_file():
                if entry.suffix in suffixes:
                    files.setdefault(entry.name, entry)
                continue
            for dirpath, dirnames, filenames in os.walk(entry):
                dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
                for f in sorted(filenames):
                    if f.endswith(suffixes):
                        path = Path(dirpath) / f
                        files.setdefault(path.relative_to(root).as_posix(), path)
    return sorted(files.items())


Listing = list[tuple[str, Path]]


def _code_texts(src: CodeSource, stats: SourceStats, files: Listing | None) -> Iterator[tuple[str, str]]:
    for name, path in files if files is not None else code_files(src):
        try:
            size = path.stat().st_size
            if size == 0 or size > src.max_file_bytes:
                stats.skipped += 1
                continue
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            stats.skipped += 1
            continue
        if not text.strip():
            stats.skipped += 1
            continue
        yield name, text


def iter_code(src: CodeSource, stats: SourceStats, files: Listing | None = None) -> Iterator[Doc]:
    """One document per file, or (``group: package``) per top-level package, its files in order.

    ``files``: the source's :func:`code_files`, when already listed (a build reads the corpus twice).
    """
    if src.group == "file":
        for name, text in _code_texts(src, stats, files):
            yield Doc(text, None, name)
        return
    parts: list[str] = []
    size, package, first = 0, None, ""
    for name, text in _code_texts(src, stats, files):
        top = name.split("/")[0]
        if parts and (top != package or size + len(text) > src.max_doc_bytes):
            yield Doc("".join(parts), None, first)
            parts, size = [], 0
        if not parts:
            package, first = top, name
        piece = f"# file: {name}\n{text}" + ("" if text.endswith("\n") else "\n")
        parts.append(piece)
        size += len(piece)
    if parts:
        yield Doc("".join(parts), None, first)


def _files_of(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in FILE_SUFFIXES)
        elif p.is_file():
            if p.suffix not in FILE_SUFFIXES:
                raise MobaError(f"{p}: cannot read {p.suffix or 'files without a suffix'}; use "
                                f"{', '.join(FILE_SUFFIXES)}")
            out.append(p)
        else:
            raise MobaError(f"file not found: {p}")
    return out


def _record_doc(rec: object, src: FilesSource, where: str) -> Doc:
    if not isinstance(rec, dict):
        raise MobaError(f"{where}: expected a JSON object")
    if src.prompt_field is not None and src.answer_field is not None:
        for key in (src.prompt_field, src.answer_field):
            if not isinstance(rec.get(key), str):
                raise MobaError(f"{where}: no text field {key!r}")
        return Doc(rec[src.prompt_field], rec[src.answer_field], where)
    if not isinstance(rec.get(src.text_field), str):
        raise MobaError(f"{where}: no text field {src.text_field!r} (choose it with text_field / --field)")
    return Doc(rec[src.text_field], None, where)


def _parquet_records(path: Path, columns: list[str]) -> Iterator[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MobaError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    pf = pq.ParquetFile(path)
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise MobaError(f"{path}: no column {missing[0]!r}; it has {', '.join(pf.schema_arrow.names)}")
    for batch in pf.iter_batches(columns=columns):
        yield from batch.to_pylist()


def iter_files(src: FilesSource, stats: SourceStats) -> Iterator[Doc]:
    sft = src.prompt_field is not None
    for path in _files_of(src.paths):
        if path.suffix in TEXT_SUFFIXES:
            if sft:
                raise MobaError(f"{path}: SFT pairs (prompt_field/answer_field) need .jsonl or .parquet files")
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                raise MobaError(f"{path} is not UTF-8 text") from None
            yield Doc(text, None, path.name)
        elif path.suffix == ".jsonl":
            with path.open("rb") as fh:
                for i, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise MobaError(f"{path}:{i}: not a JSON line ({e})") from None
                    yield _record_doc(rec, src, f"{path.name}:{i}")
        else:
            cols = [src.prompt_field, src.answer_field] if sft else [src.text_field]
            for i, rec in enumerate(_parquet_records(path, cols)):
                yield _record_doc(rec, src, f"{path.name}:{i}")


def iter_synthetic(src: SyntheticSource, index: int, seed: int, count: CountMany) -> Iterator[Doc]:
    """Documents ``0, 1, ...`` (forever unless ``src.docs``), each made from (seed, source index, i) alone."""
    i = 0
    while src.docs is None or i < src.docs:
        task = src.tasks[i % len(src.tasks)]
        length = src.lengths[i % len(src.lengths)]
        prompt, answer = make_document(task, np.random.default_rng([seed, index, i]), length, count)
        yield Doc(prompt, answer, f"{task}-{i}") if src.sft else Doc(prompt + answer, None, f"{task}-{i}")
        i += 1


def iter_source(src: Source, index: int, seed: int, count: CountMany, stats: SourceStats,
                files: Listing | None = None) -> Iterator[Doc]:
    """The documents of one source, skipping empty ones, stopping at its ``max_bytes``; ``stats`` is updated."""
    if isinstance(src, CodeSource):
        docs = iter_code(src, stats, files)
    elif isinstance(src, FilesSource):
        docs = iter_files(src, stats)
    else:
        docs = iter_synthetic(src, index, seed, count)
    cap = getattr(src, "max_bytes", None)
    for doc in docs:
        if not doc.text.strip() and not doc.answer:
            stats.skipped += 1
            continue
        n = len(doc.text.encode()) + len((doc.answer or "").encode())
        if cap is not None and stats.bytes + n > cap and stats.docs > 0:
            return
        stats.docs += 1
        stats.bytes += n
        yield doc
