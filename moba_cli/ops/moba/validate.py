"""Input checks shared by every backend. Each failure raises :class:`MobaError` with one clear message."""

from __future__ import annotations

import math
import numbers

import torch

from moba_cli.errors import MobaError

from .common import is_interp

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_HEAD_DIMS = (32, 64, 128)
BACKENDS = ("auto", "naive", "triton")
# Token positions and block ids are int32 in the kernels and the layout: larger sizes would overflow.
MAX_SIZE = 2**31 - 1


def autocast_inputs(q, k, v):
    """q, k, v cast to the autocast dtype when autocast is on for their device (as SDPA does), else as
    given. Only floating tensors are cast; anything else is left for the checks to refuse."""
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (q, k, v)):
        return q, k, v
    dev = q.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return q, k, v
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in (q, k, v))


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    softmax_scale: float | None,
    values: bool = True,
) -> list[int] | None:
    """Check shapes, dtypes and devices of q ``[B,S,Hq,D]`` / k, v ``[B,S,Hkv,D]`` or packed ``[T,H,D]``.
    Returns ``cu_seqlens`` as a host list (read once here), None without it or without ``values`` (then
    only its type, shape and device are checked here: a traced graph checks the values in the op)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise MobaError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (q.dtype == k.dtype == v.dtype):
        raise MobaError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise MobaError(f"dtype {q.dtype} is not supported; use float16, bfloat16 or float32")
    if not (q.device == k.device == v.device):
        raise MobaError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    want = 3 if cu_seqlens is not None else 4
    layout = "packed [T, H, D] with cu_seqlens" if want == 3 else "[B, S, H, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            raise MobaError(f"{name} must have rank {want} ({layout}), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise MobaError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:-2] != k.shape[:-2]:
        raise MobaError(
            f"q and k must agree on the token dimensions, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise MobaError(f"q and k must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv != 0:
        raise MobaError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    check_scale(softmax_scale)
    if cu_seqlens is not None:
        return check_cu_seqlens(cu_seqlens, q.shape[0], q.device, max_seqlen, values)
    return None


def check_cu_seqlens(
    cu_seqlens: torch.Tensor, total: int, device: torch.device, max_seqlen: int | None, values: bool = True
) -> list[int] | None:
    """Check packed offsets ``cu_seqlens [n+1]`` against ``total`` tokens; returns them as a host list
    (None when ``values`` is off: type, shape and device only)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise MobaError("cu_seqlens must be a 1-D tensor [num_seqs + 1] of sequence offsets")
    if cu_seqlens.dtype != torch.int32:
        raise MobaError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise MobaError(f"cu_seqlens must be on {device}, got {cu_seqlens.device}")
    if not values:
        return None
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise MobaError(f"cu_seqlens must start at 0, got {cu[0]}")
    if any(b < a for a, b in zip(cu[:-1], cu[1:], strict=True)):
        raise MobaError("cu_seqlens must be non-decreasing")
    if cu[-1] != total:
        raise MobaError(f"cu_seqlens ends at {cu[-1]} but q has {total} tokens")
    longest = max(b - a for a, b in zip(cu[:-1], cu[1:], strict=True))
    if max_seqlen is not None and max_seqlen < longest:
        raise MobaError(f"max_seqlen={max_seqlen} is shorter than the longest sequence ({longest})")
    return cu


def check_position_ids(position_ids: object, q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> None:
    """``position_ids`` is an integer ``[B, S]`` or ``[1, S]`` tensor for q ``[B, S, H, D]`` (shapes only:
    a traced graph checks nothing else), and comes without ``cu_seqlens``."""
    if cu_seqlens is not None:
        raise MobaError("pass cu_seqlens (packed [T, H, D] input) or position_ids ([B, S, H, D] input), not both")
    if not isinstance(position_ids, torch.Tensor):
        raise MobaError(f"position_ids must be a torch.Tensor, got {type(position_ids).__name__}")
    if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
        raise MobaError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
    b, s = q.shape[:2]
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, b) or position_ids.shape[1] != s:
        shapes = f"[{b}, {s}]" if b == 1 else f"[{b}, {s}] or [1, {s}]"
        raise MobaError(f"position_ids must be {shapes} for q {tuple(q.shape)}, got {tuple(position_ids.shape)}")


def check_scale(softmax_scale: object) -> None:
    """``softmax_scale`` is None or a finite positive real number (numpy scalars included)."""
    if softmax_scale is None:
        return
    ok = isinstance(softmax_scale, numbers.Real) and not isinstance(softmax_scale, bool)
    if not (ok and math.isfinite(softmax_scale) and softmax_scale > 0):
        raise MobaError(f"softmax_scale must be a finite positive number, got {softmax_scale!r}")


def _integer(x: object) -> bool:
    # numbers.Integral takes numpy integers too; bool is an int but never a size
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_moba_params(chunk_size: int, topk: int) -> tuple[int, int]:
    """Check ``chunk_size`` and ``topk`` (Python or numpy integers, 1 .. 2^31-1); returns them as ints."""
    if not _integer(chunk_size) or chunk_size <= 0:
        raise MobaError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if not _integer(topk) or topk < 1:
        raise MobaError(f"topk must be an integer >= 1 (it counts the query's own block), got {topk!r}")
    for name, x in (("chunk_size", chunk_size), ("topk", topk)):
        if x > MAX_SIZE:
            raise MobaError(f"{name} must be at most {MAX_SIZE} (int32 block arithmetic), got {x}")
    return int(chunk_size), int(topk)


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """Pick the backend: ``auto`` is triton on CUDA (or under the Triton interpreter, except for bfloat16),
    naive elsewhere."""
    if backend not in BACKENDS:
        raise MobaError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    # Triton 3.6's interpreter reads bfloat16 dot operands as raw integers: its results would be garbage.
    interp_ok = is_interp() and q.device.type == "cpu" and q.dtype != torch.bfloat16
    if backend == "auto":
        return "triton" if (q.is_cuda or interp_ok) else "naive"
    if backend == "triton":
        if not q.is_cuda and not is_interp():
            raise MobaError(
                "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests); "
                f"got tensors on {q.device}. Use backend='naive' on CPU."
            )
        if not q.is_cuda and not interp_ok:
            raise MobaError(
                "the triton backend under TRITON_INTERPRET=1 cannot compute in bfloat16 (the interpreter's "
                "matrix products misread it); use float32 or float16 inputs on CPU, or backend='naive'"
            )
        d = q.shape[-1]
        if d not in TRITON_HEAD_DIMS:
            raise MobaError(
                f"head dim {d} is not supported by the triton backend; supported: "
                f"{', '.join(map(str, TRITON_HEAD_DIMS))} (backend='naive' takes any)"
            )
    return backend
