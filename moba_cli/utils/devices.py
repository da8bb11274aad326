"""Device and dtype names a user types (``auto``, ``cuda:1``, ``bf16``) turned into torch objects.

Library code (bench, analysis, evals) and the commands share these, so the rules and messages live once.
torch is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moba_cli.errors import MobaError

if TYPE_CHECKING:
    import torch

DTYPES = ("bfloat16", "float16", "float32")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def parse_dtype(name: str) -> torch.dtype:
    """``bf16``/``bfloat16``, ``fp16``/``half``/``float16``, ``fp32``/``float``/``float32`` -> torch dtype."""
    import torch

    key = DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in DTYPES:
        raise MobaError(f"unknown dtype {name!r}; choose bfloat16 (bf16), float16 (fp16) or float32 (fp32)")
    return getattr(torch, key)


def resolve_device(name: str) -> torch.device:
    """``auto`` is cuda when available, else cpu. Asking for cuda without a GPU is an error."""
    import torch

    name = name.lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MobaError("no CUDA GPU is available on this machine; use --device cpu for a small run")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise MobaError(f"unknown device {name!r}; use auto, cpu or cuda")
