"""Device and dtype names as users write them (``auto``, ``cuda:1``, ``bf16``), for commands and libraries alike.

torch is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moba_cli.errors import MobaError

if TYPE_CHECKING:
    import torch

DTYPES = ("bfloat16", "float16", "float32")
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16``; anything outside :data:`DTYPES` (and their aliases) is a MobaError."""
    import torch

    key = _DTYPE_ALIASES.get(name.lower(), name.lower())
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
        try:
            device = torch.device(name)
        except RuntimeError:
            raise MobaError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MobaError(f"{name} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
        return device
    if name == "cpu":
        return torch.device("cpu")
    raise MobaError(f"unknown device {name!r}; use auto, cpu or cuda")
