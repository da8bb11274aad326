"""Resume state of a long evaluation: finished cells, one JSON line each, in a partial file.

The file is named after a fingerprint of the run's settings, so ``--resume`` only ever continues the same
run. Each line is written and flushed as soon as its cell is done; an interrupted run loses at most the
cell in progress. The file is removed once the final result is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moba_cli.errors import MobaError


def fingerprint(settings: dict[str, Any]) -> str:
    """A short stable hash of the settings that decide the results."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def out_folder(out: Path | str | None, default_dir: Path | str) -> Path:
    """The folder a result goes to: ``out`` itself, or its parent when ``out`` names a ``.json`` file."""
    target = Path(out) if out is not None else Path(default_dir)
    return target.parent if target.suffix == ".json" else target


class PartialRun:
    """Cells finished so far, keyed by a tuple of their identifying fields."""

    def __init__(self, folder: Path, kind: str, settings: dict[str, Any], key_fields: Iterable[str]):
        self.fp = fingerprint(settings)
        self.path = Path(folder) / f".{kind}-{self.fp}.partial.jsonl"
        self.settings = settings
        self.key_fields = tuple(key_fields)
        self.done: dict[tuple, dict[str, Any]] = {}
        self.resumed = 0

    def key(self, record: dict[str, Any]) -> tuple:
        return tuple(record[f] for f in self.key_fields)

    def open(self, resume: bool) -> list[str]:
        """Load finished cells when resuming; start a new file otherwise. Returns notes for the user."""
        notes = []
        if resume and self.path.is_file():
            lines = self.path.read_text().splitlines()
            try:
                header = json.loads(lines[0]) if lines else {}
            except json.JSONDecodeError:
                header = {}
            if header.get("fingerprint") != self.fp:
                raise MobaError(f"{self.path} was written by other settings; remove it or drop --resume")
            for line in lines[1:]:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the interruption: that cell runs again
                    continue
                self.done[self.key(rec)] = rec
            self.resumed = len(self.done)
            notes.append(f"resumed {self.resumed} finished cell(s) from {self.path}")
            self._rewrite()  # drops a cut last line
            return notes
        if resume:
            notes.append(f"--resume: no partial run with these settings in {self.path.parent}; starting fresh")
        elif self.path.is_file():
            notes.append("an earlier partial run with these settings was replaced (use --resume to continue one)")
        self._rewrite()
        return notes

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as f:
            f.write(json.dumps({"fingerprint": self.fp, "settings": self.settings}, default=str) + "\n")
            for rec in self.done.values():
                f.write(json.dumps(rec, default=str) + "\n")
        tmp.replace(self.path)

    def has(self, *key: Any) -> bool:
        return tuple(key) in self.done

    def add(self, record: dict[str, Any]) -> None:
        self.done[self.key(record)] = record
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)
