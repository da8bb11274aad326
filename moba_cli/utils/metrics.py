"""Error measures shared by the bench's spot-checks and ``moba compare`` (and the tests)."""

from __future__ import annotations

import math
from typing import Any

import torch


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error ``||a - ref|| / ||ref||`` in float64 (equal to ``rms(a - ref) / rms(ref)``).

    ``ref`` may live on another device (moved to ``a``'s). NaN or inf in either gives NaN, never a small
    number: a poisoned output must not pass a check. Meant for tensors that fit twice in memory in float64
    (sampled rows, test sizes); stream larger ones.
    """
    a, ref = a.double(), ref.to(a.device).double()
    num, den = float((a - ref).norm()), float(ref.norm())
    if not math.isfinite(num) or not math.isfinite(den):
        return float("nan")
    return num / max(den, 1e-30)


def finite_or_none(x: float | None) -> float | None:
    """``x`` when it is a finite number, else None: result JSON holds no NaN/Infinity (strict JSON)."""
    return x if x is not None and math.isfinite(x) else None


def strict_floats(obj: Any, path: str = "") -> tuple[Any, list[str]]:
    """A copy of nested dicts/lists with every NaN/inf float replaced by None, and the paths replaced.

    >>> strict_floats({"a": [1.0, float("nan")]})
    ({'a': [1.0, None]}, ['a[1]'])
    """
    if isinstance(obj, float):
        return (obj, []) if math.isfinite(obj) else (None, [path or "value"])
    if isinstance(obj, dict):
        out, bad = {}, []
        for key, value in obj.items():
            out[key], sub = strict_floats(value, f"{path}.{key}" if path else str(key))
            bad += sub
        return out, bad
    if isinstance(obj, list | tuple):
        items = [strict_floats(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        return type(obj)(v for v, _ in items), [p for _, sub in items for p in sub]
    return obj, []
