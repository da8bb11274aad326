"""Parse token counts written the way people say them: ``4k``, ``128K``, ``1m``, ``10m``, ``65536``."""

from __future__ import annotations

from moba_cli.errors import MobaError

_UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str | int) -> int:
    """``"4k"`` -> 4096, ``"1m"`` -> 1048576 (binary units, as sequence lengths usually are), ``"300"`` -> 300."""
    if isinstance(text, int):
        value = text
    else:
        s = str(text).strip().lower()
        mult = 1
        if s and s[-1] in _UNITS:
            mult, s = _UNITS[s[-1]], s[:-1]
        try:
            exact = float(s) * mult if "." in s else int(s) * mult
        except ValueError:
            raise MobaError(f"cannot read {text!r} as a size; write e.g. 4096, 4k, 128k, 1m or 10m") from None
        if exact != int(exact):
            raise MobaError(f"size {text!r} is not a whole number of tokens")
        value = int(exact)
    if value <= 0:
        raise MobaError(f"size must be positive, got {text!r}")
    return value


def parse_size_list(text: str) -> list[int]:
    """``"32k,128k,1m"`` -> ``[32768, 131072, 1048576]``."""
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise MobaError("expected at least one size, e.g. 32k,128k,1m")
    return [parse_size(p) for p in parts]


def format_size(n: int) -> str:
    """Inverse of :func:`parse_size` for round numbers: 1048576 -> ``"1m"``, 5000 -> ``"5000"``."""
    for unit, mult in (("g", 1024**3), ("m", 1024**2), ("k", 1024)):
        if n % mult == 0 and n >= mult:
            return f"{n // mult}{unit}"
    return str(n)
