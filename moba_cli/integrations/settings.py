"""The MoBA settings of a transformers model: the ``config.moba`` schema and the ``--full-layers`` syntax.

Config schema (``config.json`` of a converted checkpoint)::

    "attn_implementation": "moba",
    "moba": {"version": 1, "chunk_size": 4096, "topk": 12, "full_layers": [29, 30, 31]}

``full_layers`` lists the layers that keep dense causal attention; every other layer runs MoBA. An optional
``"backend"`` key (``auto``/``naive``/``triton``) picks the kernel; it is a runtime choice and not written by
``moba convert``. This module imports neither torch nor transformers.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moba_cli.errors import MobaError

IMPL_NAME = "moba"
CONFIG_KEY = "moba"
SCHEMA_VERSION = 1
FULL_IMPL = "sdpa"  # what ``attn="full"`` loads: transformers' own dense attention
DENSE_IMPL_NAME = "moba_dense"
"""Every layer full, through :func:`moba_cli.full_attention` (SDPA, cuDNN first, one call per packed
sequence): document-masked full attention without a mask tensor, for training full-attention baselines."""



@dataclass(frozen=True)
class MobaSettings:
    """The MoBA settings of one model, read from ``config.moba``."""

    chunk_size: int
    topk: int
    full_layers: tuple[int, ...] = ()
    backend: str = "auto"

    def to_config(self) -> dict[str, Any]:
        """The dict stored as ``config.moba`` (``backend`` only when it is not the default)."""
        d: dict[str, Any] = {
            "version": SCHEMA_VERSION,
            "chunk_size": self.chunk_size,
            "topk": self.topk,
            "full_layers": list(self.full_layers),
        }
        if self.backend != "auto":
            d["backend"] = self.backend
        return d

    @classmethod
    def from_config(cls, config: Any) -> MobaSettings:
        raw = getattr(config, CONFIG_KEY, None)
        if not isinstance(raw, dict):
            raise MobaError(
                "this model's config has no 'moba' settings; convert the checkpoint with `moba convert` "
                "or load it with moba_cli.load_model(path, chunk_size=..., topk=...)"
            )
        version = raw.get("version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise MobaError(f"config.moba has version {version}; this moba understands version {SCHEMA_VERSION}")
        try:
            chunk, topk = raw["chunk_size"], raw["topk"]
        except KeyError as e:
            raise MobaError(f"config.moba lacks {e.args[0]!r}") from None
        for name, value in (("chunk_size", chunk), ("topk", topk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MobaError(f"config.moba.{name} must be a positive integer, got {value!r}")
        full = raw.get("full_layers", []) or []
        if not isinstance(full, list | tuple) or not all(isinstance(i, int) for i in full):
            raise MobaError(f"config.moba.full_layers must be a list of layer indices, got {full!r}")
        backend = raw.get("backend", "auto")
        if backend not in ("auto", "naive", "triton"):
            raise MobaError(f"config.moba.backend must be auto, naive or triton, got {backend!r}")
        return cls(chunk_size=chunk, topk=topk, full_layers=tuple(sorted(set(full))), backend=backend)


def parse_full_layers(spec: str | Sequence[int] | None, num_layers: int) -> list[int]:
    """Which layers keep full attention.

    ``spec``: ``"last:3"``, ``"first:2"``, ``"none"``, ``"all"``, or explicit indices ``"0,5,31"`` (negative
    indices count from the end, ``a-b`` is an inclusive range of non-negative indices), or a list of ints.
    Returns sorted indices; anything else is one :class:`MobaError` line.
    """
    if spec is None:
        return []
    if not isinstance(spec, str):
        items: list[int] = list(spec)
    else:
        s = spec.strip().lower().replace(" ", "")
        if s in ("", "none"):
            return []
        if s == "all":
            return list(range(num_layers))
        if s.startswith(("last:", "first:")):
            kind, _, n_text = s.partition(":")
            if not n_text.isdigit():
                raise MobaError(f"cannot read --full-layers {spec!r}; write e.g. last:3, first:2, 0,5,31 or none")
            n = int(n_text)
            if n > num_layers:
                raise MobaError(f"--full-layers {spec!r} asks for {n} layers but the model has {num_layers}")
            return list(range(num_layers - n, num_layers)) if kind == "last" else list(range(n))
        items = []
        for part in s.split(","):
            single = re.fullmatch(r"-?\d+", part)
            span = re.fullmatch(r"(\d+)-(\d+)", part)
            if single is not None:
                items.append(int(part))
                continue
            if span is None:
                why = "a range takes two non-negative indices (4-7)" if re.fullmatch(r"-?\d+--?\d+", part) else ""
                raise MobaError(
                    f"cannot read --full-layers {spec!r}"
                    + (f": {why}" if why else "")
                    + "; write e.g. last:3, first:2, 0,5,31, 4-7 or none"
                )
            lo, hi = int(span.group(1)), int(span.group(2))
            if hi < lo:
                raise MobaError(f"cannot read --full-layers {spec!r}: the range {part} runs backwards ({hi}-{lo})")
            items.extend(range(lo, hi + 1))
    out = set()
    for i in items:
        try:
            idx = None if isinstance(i, bool) else operator.index(i)  # numpy integers count as integers
        except TypeError:
            idx = None
        if idx is None or not -num_layers <= idx < num_layers:
            raise MobaError(
                f"full layer {i!r} is out of range: the model has {num_layers} layers (0..{num_layers - 1})"
            )
        out.add(idx % num_layers)
    return sorted(out)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (a library's multi-line error becomes one ``error:`` line)."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
