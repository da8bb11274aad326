"""Parse token counts written the way people say them: ``4k``, ``128K``, ``1m``, ``10m``, ``65536``."""

from __future__ import annotations

import operator

from moba_cli.errors import MobaError
from moba_cli.utils.limits import MAX_TOKENS as MAX_SIZE

_UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str | int, limit: int = MAX_SIZE) -> int:
    """``"4k"`` -> 4096, ``"1m"`` -> 1048576 (binary units, as sequence lengths usually are), ``"300"`` -> 300.

    Integers (Python or numpy) are taken as they are. Anything not a whole number in ``[1, limit]`` is a
    :class:`MobaError` quoting what was given.
    """
    if isinstance(text, bool):
        raise MobaError(f"cannot read {text!r} as a size; write e.g. 4096, 4k, 128k, 1m or 10m")
    if not isinstance(text, str):
        try:
            value = operator.index(text)  # int, numpy integers
        except TypeError:
            raise MobaError(f"cannot read {text!r} as a size; write e.g. 4096, 4k, 128k, 1m or 10m") from None
    else:
        value = _parse_text(text)
    if value <= 0:
        raise MobaError(f"size must be positive, got {text!r}")
    if value > limit:
        raise MobaError(f"size {text!r} is too large: at most {limit} ({format_size(limit)})")
    return value


def _parse_text(text: str) -> int:
    s = text.strip().lower()
    mult = 1
    if s and s[-1] in _UNITS:
        mult, s = _UNITS[s[-1]], s[:-1]
    if not s or not all(c.isdigit() or c == "." for c in s) or s.count(".") > 1 or s == ".":
        raise MobaError(f"cannot read {text!r} as a size; write e.g. 4096, 4k, 128k, 1m or 10m")
    if len(s) > 30:  # far past any limit; also keeps float() below from reaching infinity
        raise MobaError(f"size {text!r} is too large")
    whole, _, frac = s.partition(".")
    # exact arithmetic: 1.5k is 1536 exactly, 0.0001k is not a whole number of tokens
    numerator = int(whole or "0") * 10 ** len(frac) + int(frac or "0")
    scaled, rest = divmod(numerator * mult, 10 ** len(frac))
    if rest:
        raise MobaError(f"size {text!r} is not a whole number of tokens")
    return scaled


def parse_size_list(text: str, limit: int = MAX_SIZE) -> list[int]:
    """``"32k,128k,1m"`` -> ``[32768, 131072, 1048576]``."""
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise MobaError("expected at least one size, e.g. 32k,128k,1m")
    return [parse_size(p, limit) for p in parts]


def format_size(n: int) -> str:
    """Inverse of :func:`parse_size` for round numbers: 1048576 -> ``"1m"``, 5000 -> ``"5000"``."""
    for unit, mult in (("g", 1024**3), ("m", 1024**2), ("k", 1024)):
        if n % mult == 0 and n >= mult:
            return f"{n // mult}{unit}"
    return str(n)
