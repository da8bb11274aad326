"""Haystacks and long documents, never downloaded: noise sentences, source code on this machine, a user file.

* ``noise``: RULER's repeated filler ("The grass is green. The sky is blue. ..."): nothing in it competes with
  the needle, so retrieval is tested in isolation.
* ``code``: the Python standard library's ``.py`` files of the running interpreter, read in sorted order
  (the same text on every machine with the same Python).
* a file path: the user's text; repeated, with a note, when shorter than needed.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moba_cli.errors import MobaError

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_CODE_MAX_FILE_BYTES = 400_000  # skip huge generated modules; they are mostly tables


@dataclass
class HaystackTokens:
    ids: list[int]
    source: str  # "noise", "code" or the file's path
    notes: list[str] = field(default_factory=list)


def describe(source: str) -> str:
    """How the haystack is named in results: ``noise``, ``code`` or the file's absolute path."""
    return source if source in ("noise", "code") else str(Path(source).resolve())


def check_source(source: str) -> None:
    """Fail before loading the model when a haystack file is missing, unreadable or empty."""
    if source in ("noise", "code"):
        return
    p = Path(source)
    if not p.is_file():
        raise MobaError(f"haystack {source!r} is neither noise, code nor an existing file")
    try:
        with p.open(encoding="utf-8", errors="replace") as f:
            if not f.read(4096).strip():
                raise MobaError(f"haystack file {source} is empty")
    except OSError as e:
        raise MobaError(f"cannot read haystack file {source}: {e.strerror or e}") from None


def code_files() -> list[Path]:
    """The standard library's ``.py`` files (tests and site-packages left out), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if rel[0] in ("site-packages", "dist-packages", "test", "idlelib", "lib2to3") or "tests" in rel:
            continue
        try:
            if p.stat().st_size <= _CODE_MAX_FILE_BYTES:
                out.append(p)
        except OSError:
            continue
    return out


def _texts(source: str):
    """Pieces of text of ``source``, in order, as long as asked for (noise and files repeat)."""
    if source == "noise":
        while True:
            yield NOISE * 64
    elif source == "code":
        files = code_files()
        if not files:
            raise MobaError("no Python source files found on this machine for the code haystack; give a FILE")
        for p in files:
            try:
                yield f"# file: {p.name}\n" + p.read_text(encoding="utf-8", errors="replace") + "\n"
            except OSError:
                continue
    else:
        try:
            text = Path(source).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise MobaError(f"cannot read haystack file {source}: {e.strerror or e}") from None
        if not text.strip():
            raise MobaError(f"haystack file {source} is empty")
        while True:
            yield text if text.endswith("\n") else text + "\n"


def haystack_tokens(tokenizer: Any, source: str, n_tokens: int, *, repeat: bool = True) -> HaystackTokens:
    """``n_tokens`` token ids of ``source`` (no special tokens), tokenized piece by piece.

    Pieces end at a newline or sentence end, so tokenizing them apart matches tokenizing the whole text
    except at those seams. ``repeat=False``: a file shorter than ``n_tokens`` is an error, not repeated.
    """
    ids: list[int] = []
    pieces = 0
    first_len = None
    for text in _texts(source):
        piece = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if first_len is None:
            first_len = len(piece)
        ids.extend(piece)
        pieces += 1
        if len(ids) >= n_tokens:
            break
        if not repeat and source not in ("noise", "code"):
            raise MobaError(f"{source} has {len(ids)} tokens; {n_tokens} are needed (shorten --seq or --docs)")
    if not ids:
        raise MobaError(f"the {source} haystack gives no tokens")
    notes = []
    if len(ids) < n_tokens:
        raise MobaError(f"the {source} haystack has only {len(ids)} tokens; {n_tokens} are needed")
    if source not in ("noise", "code") and pieces > 1:
        notes.append(
            f"haystack file {source} has {first_len} tokens; it was repeated {pieces} times to fill {n_tokens}"
        )
    return HaystackTokens(ids[:n_tokens], describe(source), notes)
