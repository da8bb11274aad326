"""What ``moba data build`` builds: the sources, their mixture, the tokenizer and the split.

The same dataclasses are read from a recipe's ``data:`` section (a dict) and filled from CLI flags.
Sizes may be written ``2m``, ``64k`` (binary units, see :mod:`moba_cli.utils.sizes`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints

from moba_cli.errors import MobaError
from moba_cli.utils.sizes import parse_size

SYNTHETIC_TASKS = ("passkey", "kv", "vartrack", "needle", "needle_multi", "kv_multi", "repeat")
DEFAULT_SYNTHETIC_TASKS = ("passkey", "kv", "vartrack")  # the others are opt-in
MIN_VOCAB = 256 + 3 + 1  # every byte, bos/eos/pad, and at least one merge
_SIZE = {"size": True}  # field metadata: accepts "2m"-style sizes


@dataclass
class CodeSource:
    """Source files of the installed Python packages (site-packages), read in sorted path order."""

    kind: str = "code"
    include: list[str] = field(default_factory=list)
    """Top-level package names or globs to read (``torch``, ``numpy*``); empty reads every package."""
    exclude: list[str] = field(default_factory=list)
    """Top-level package names or globs to skip."""
    suffixes: list[str] = field(default_factory=lambda: [".py"])
    """File endings that count as documents (add ``.md``, ``.rst``, ``.txt`` for documentation)."""
    roots: list[str] = field(default_factory=list)
    """Folders to read instead of this interpreter's site-packages (another environment, or tests)."""
    max_bytes: int | None = field(default=None, metadata=_SIZE)
    """Stop reading this source after this many bytes of text (None: no cap)."""
    max_file_bytes: int = field(default=1 << 20, metadata=_SIZE)
    """Skip files larger than this (generated tables and vendored bundles are not code to learn from)."""
    group: str = "file"
    """``file``: one document per file. ``package``: one per top-level package, its files joined in path
    order under ``# file: NAME`` lines: long documents with real long-range structure (imports, calls
    across files), for long-context training."""
    max_doc_bytes: int = field(default=8 << 20, metadata=_SIZE)
    """``group: package``: start a new document (at a file boundary) once one reaches this size."""
    fraction: float | None = None
    """Share of the dataset's tokens from this source when several are mixed (None: an equal share of
    what the sources with a fraction leave)."""


@dataclass
class FilesSource:
    """Local ``.txt`` files (one document each), ``.jsonl`` (one document a line) or ``.parquet`` (a row)."""

    kind: str = "files"
    paths: list[str] = field(default_factory=list)
    """Files or folders (folders are read recursively, in sorted order)."""
    text_field: str = "text"
    """The text field of ``.jsonl`` lines and the text column of ``.parquet`` files."""
    prompt_field: str | None = None
    """With ``answer_field``: read SFT pairs, with the loss only on the answer tokens."""
    answer_field: str | None = None
    """The answer field of SFT pairs (see ``prompt_field``)."""
    max_bytes: int | None = field(default=None, metadata=_SIZE)
    """Stop reading this source after this many bytes of text (None: no cap)."""
    fraction: float | None = None
    """Share of the dataset's tokens from this source when several are mixed (see CodeSource.fraction)."""


@dataclass
class SyntheticSource:
    """Long-context retrieval documents from the project's templates (passkey, key-value, variable chain)."""

    kind: str = "synthetic"
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_SYNTHETIC_TASKS))
    """Which templates to use, in turn: ``passkey`` (a number hidden in filler), ``kv`` (look a key up
    in a list of key-value pairs), ``vartrack`` (follow a chain of variable assignments), ``needle``
    (``moba eval needle``'s own prompt form), ``needle_multi`` / ``kv_multi`` (many facts, every one asked
    and answered: dense retrieval signal for small models), ``repeat`` (a passage written twice: copying
    on every token of the copy); the last four are not in the default set."""
    lengths: list[int] = field(default_factory=lambda: [2048], metadata=_SIZE)
    """Target lengths in tokens; document ``i`` takes ``lengths[i % len(lengths)]``."""
    docs: int | None = None
    """How many documents to make (None: as many as the mixture and ``max_tokens`` call for)."""
    sft: bool = False
    """Write prompt/answer pairs (loss only on the answer) instead of plain documents."""
    fraction: float | None = None
    """Share of the dataset's tokens from this source when several are mixed (see CodeSource.fraction)."""


Source = CodeSource | FilesSource | SyntheticSource
SOURCE_KINDS: dict[str, type] = {"code": CodeSource, "files": FilesSource, "synthetic": SyntheticSource}


@dataclass
class DataConfig:
    """A dataset build: its sources, tokenizer, size and split."""

    sources: list[Source] = field(default_factory=list)
    """Where the documents come from, mixed by each source's ``fraction``."""
    vocab_size: int = 4096
    """Vocabulary of the byte-level BPE tokenizer trained on the corpus (ignored with ``tokenizer``)."""
    max_tokens: int | None = field(default=None, metadata=_SIZE)
    """Stop after this many tokens (both splits together); needed when every source is unbounded."""
    val_fraction: float = 0.01
    """Share of documents in the validation split, chosen by a hash of each document and the seed."""
    seed: int = 0
    """Seeds the split and the synthetic documents."""
    tokenizer: str | None = None
    """Reuse this tokenizer (a dataset folder or its ``tokenizer/``) instead of training one."""
    tokenizer_bytes: int = field(default=256 << 20, metadata=_SIZE)
    """At most this much text trains the tokenizer (a deterministic sample of the documents)."""
    out: str | None = None
    """The dataset folder (not part of the dataset's identity, so it is left out of its hashes)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the manifest (``out`` left out: where a dataset lives does not change it)."""
        d = dataclasses.asdict(self)
        d.pop("out")
        return d


def source_from_dict(d: Any, where: str) -> Source:
    if not isinstance(d, dict):
        raise MobaError(f"{where}: expected a mapping with a 'kind', got {type(d).__name__}")
    kind = d.get("kind")
    if kind not in SOURCE_KINDS:
        raise MobaError(f"{where}: unknown source kind {kind!r}; choose one of {', '.join(SOURCE_KINDS)}")
    return _from_dict(SOURCE_KINDS[kind], d, where)


def config_from_dict(d: Any, where: str = "data") -> DataConfig:
    """A :class:`DataConfig` from a recipe's ``data:`` mapping; unknown keys and wrong types are errors."""
    if not isinstance(d, dict):
        raise MobaError(f"{where}: expected a mapping, got {type(d).__name__}")
    d = dict(d)
    raw_sources = d.pop("sources", [])
    if not isinstance(raw_sources, list):
        raise MobaError(f"{where}.sources: expected a list of sources")
    cfg = _from_dict(DataConfig, d, where)
    cfg.sources = [source_from_dict(s, f"{where}.sources[{i}]") for i, s in enumerate(raw_sources)]
    validate(cfg, where)
    return cfg


def validate(cfg: DataConfig, where: str = "data") -> None:
    """The checks no single field can make: a corpus to read, a usable vocabulary, a sane mixture."""
    if not cfg.sources:
        raise MobaError(f"{where}: no sources; add at least one (code, files or synthetic)")
    if cfg.tokenizer is None and cfg.vocab_size < MIN_VOCAB:
        raise MobaError(f"{where}.vocab_size {cfg.vocab_size} is too small: a byte-level BPE needs at least "
                        f"{MIN_VOCAB} (256 bytes, 3 special tokens, one merge)")
    if cfg.vocab_size > 1 << 32:
        raise MobaError(f"{where}.vocab_size {cfg.vocab_size} does not fit uint32 token ids")
    for key in ("max_tokens", "tokenizer_bytes"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise MobaError(f"{where}.{key} must be positive, got {getattr(cfg, key)}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise MobaError(f"{where}.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    fractions = [s.fraction for s in cfg.sources if s.fraction is not None]
    for i, s in enumerate(cfg.sources):
        name = f"{where}.sources[{i}]"
        if s.fraction is not None and not 0.0 < s.fraction <= 1.0:
            raise MobaError(f"{name}.fraction must be in (0, 1], got {s.fraction}")
        for key in ("max_bytes", "max_file_bytes", "max_doc_bytes"):
            if getattr(s, key, None) is not None and getattr(s, key) < 1:
                raise MobaError(f"{name}.{key} must be positive, got {getattr(s, key)}")
        if isinstance(s, CodeSource) and s.group not in ("file", "package"):
            raise MobaError(f"{name}.group must be file or package, got {s.group!r}")
        if isinstance(s, FilesSource):
            if not s.paths:
                raise MobaError(f"{name}: a files source needs paths")
            if (s.prompt_field is None) != (s.answer_field is None):
                raise MobaError(f"{name}: give both prompt_field and answer_field (SFT pairs) or neither")
        if isinstance(s, SyntheticSource):
            bad = [t for t in s.tasks if t not in SYNTHETIC_TASKS]
            if bad or not s.tasks:
                raise MobaError(f"{name}.tasks: unknown {bad or 'empty list'}; "
                                f"choose from {', '.join(SYNTHETIC_TASKS)}")
            if not s.lengths or min(s.lengths) < 64:
                raise MobaError(f"{name}.lengths: give target lengths of at least 64 tokens, got {s.lengths}")
            if s.docs is not None and s.docs < 1:
                raise MobaError(f"{name}.docs must be positive")
    total = sum(fractions)
    if total > 1.0 + 1e-6 or (len(fractions) == len(cfg.sources) and len(cfg.sources) > 1 and total < 1.0 - 1e-6):
        raise MobaError(f"{where}: source fractions add up to {total:g}; they must add up to 1 (or stay below 1 "
                        "when some sources have none)")
    if len(fractions) < len(cfg.sources) and len(fractions) > 0 and total >= 1.0 - 1e-6:
        raise MobaError(f"{where}: the fractions given add up to 1, leaving nothing for the sources without one")
    unbounded = all(isinstance(s, SyntheticSource) and s.docs is None for s in cfg.sources)
    if unbounded and cfg.max_tokens is None:
        raise MobaError(f"{where}: synthetic sources without 'docs' (--synthetic-docs) never end; set max_tokens "
                        "(--max-tokens) or docs")


def mixture_weights(cfg: DataConfig) -> list[float]:
    """Each source's share of tokens: its fraction, or an equal part of what the fractions leave."""
    given = sum(s.fraction for s in cfg.sources if s.fraction is not None)
    n_free = sum(s.fraction is None for s in cfg.sources)
    rest = (1.0 - given) / n_free if n_free else 0.0
    return [s.fraction if s.fraction is not None else rest for s in cfg.sources]


def _from_dict(cls: type, d: dict[str, Any], where: str) -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise MobaError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(fields))}")
    values = {k: _coerce(v, hints[k], fields[k].metadata.get("size", False), f"{where}.{k}") for k, v in d.items()
              if k != "sources"}
    return cls(**values)


def _coerce(value: Any, tp: Any, size: bool, where: str) -> Any:
    """``value`` checked against the annotation ``tp`` (int, float, str, bool, list[...], X | None)."""
    origin, args = get_origin(tp), get_args(tp)
    if args and type(None) in args and origin is not list:
        if value is None:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        origin, args = get_origin(tp), get_args(tp)
    if origin is list:
        if isinstance(value, str | int) and not isinstance(value, bool):
            value = [value]  # one item may be written without brackets
        if not isinstance(value, list):
            raise MobaError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], size, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise MobaError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if size and isinstance(value, str):
            try:
                return parse_size(value)
            except MobaError as e:
                raise MobaError(f"{where}: {e}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise MobaError(f"{where}: expected a whole number, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MobaError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise MobaError(f"{where}: expected text, got {value!r}")
        return value
    raise MobaError(f"internal: no rule for {tp!r} at {where}")
