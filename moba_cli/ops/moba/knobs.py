"""Readers for the kernel-development environment variables (``MOBA_*``), shared by the kernels'
modules: a bad value is a :class:`~moba_cli.errors.MobaError`, never a silent default."""

from __future__ import annotations

import os

from moba_cli.errors import MobaError


def env_str(name: str) -> str | None:
    return os.environ.get(name) or None


def env_flag(name: str) -> bool | None:
    """An on/off knob: ``1`` / ``0``, None when unset; any other value is an error."""
    val = env_str(name)
    if val not in (None, "0", "1"):
        raise MobaError(f"{name} must be 0 or 1, got {val!r}")
    return None if val is None else val == "1"


def env_int(name: str, lo: int, hi: int) -> int | None:
    """A small integer knob in ``lo .. hi``, None when unset; anything else is an error."""
    val = env_str(name)
    if val is None:
        return None
    if not val.isdigit() or not lo <= int(val) <= hi:
        raise MobaError(f"{name} must be an integer from {lo} to {hi}, got {val!r}")
    return int(val)
