"""Small helpers every kernel module shares (a leaf: imports nothing else of the op)."""

from __future__ import annotations

import os

import torch

LOG2E = 1.4426950408889634


def is_interp() -> bool:
    """Whether Triton runs under its CPU interpreter (``TRITON_INTERPRET=1``, the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def empty(*shape: int, dtype: torch.dtype, device: torch.device, poison: bool = False) -> torch.Tensor:
    """``torch.empty``; with ``poison`` filled with NaN (floats) or -7 (ints), so an element a kernel forgets
    to write shows up in a test instead of passing with stale memory."""
    if not poison:
        return torch.empty(*shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -7
    return torch.full(shape, fill, dtype=dtype, device=device)


def fixed_launch_config(cfg: tuple[int, ...] | None) -> dict | None:
    """A kernel's launch config where it does not depend on the shape: ``cfg`` (a KernelOptions override,
    ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``), or the interpreter's small tiles; else None."""
    if cfg:
        return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), cfg, strict=True))
    if is_interp():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    return None


def hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def prec(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: float32 inputs are meant for exact checks, so full float32 products, not TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def contig_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
