"""What ``moba compare`` runs on: resolved options (:class:`CompareSetup`), the backend, and the q/k/v inputs
(seeded random, or read from a safetensors file)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moba_cli.errors import MobaError
from moba_cli.ops.moba.validate import SUPPORTED_DTYPES, TRITON_HEAD_DIMS, resolve_backend
from moba_cli.utils.limits import check_at_most, check_seed

# Defaults of `moba compare` with no options. Both keep chunk/topk at 16 blocks with 3 chosen, the
# ratio of the paper's 8K runs (block 512, top-k 3), so a first run shows real sparsity (~80%).
# CPU: small enough for the float32 reference to finish in seconds on 2 cores.
# CUDA: a realistic long-context shape (32K tokens, 8 heads of 128) that runs in well under a minute.
DEFAULTS: dict[str, dict[str, int]] = {
    "cpu": {"seq": 2048, "batch": 1, "heads": 4, "head_dim": 64, "chunk": 128, "topk": 3},
    "cuda": {"seq": 32768, "batch": 1, "heads": 8, "head_dim": 128, "chunk": 2048, "topk": 3},
}


@dataclass
class CompareSetup:
    """Resolved options of one comparison (all sizes known, backend picked)."""

    seq: int
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    chunk: int
    topk: int
    dtype: torch.dtype
    device: torch.device
    backend: str
    seed: int = 0
    qkv: Path | None = None
    notes: list[str] = field(default_factory=list)

    def config(self) -> dict[str, Any]:
        d = asdict(self)
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        d["device"] = str(self.device)
        d["qkv"] = str(self.qkv) if self.qkv is not None else None
        d["inputs"] = "file" if self.qkv is not None else "random (randn)"
        d["softmax_scale"] = 1.0 / math.sqrt(self.head_dim)
        d.pop("notes")
        return d


def default_dtype(device: torch.device) -> torch.dtype:
    """``auto`` dtype: bfloat16 on CUDA (what long-context models run in), float32 on CPU (the naive
    backend computes in float32 anyway and CPU half-precision matmuls are slow)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def pick_backend(backend: str, device: torch.device, head_dim: int) -> tuple[str, str | None]:
    """Resolve ``auto|naive|triton`` for this device and head dim; returns ``(backend, note)``.

    ``auto`` is triton on CUDA when the kernels take the head dim, else naive. Unlike the library's
    ``auto`` it ignores TRITON_INTERPRET: the interpreter is for tests, far too slow for a comparison.
    """
    backend = backend.lower()
    if backend == "auto":
        if device.type != "cuda":
            return "naive", None
        if head_dim not in TRITON_HEAD_DIMS:
            return "naive", f"head dim {head_dim} has no triton kernel; using the float32 naive backend"
        return "triton", None
    # The library's own checks (unknown name, triton on CPU, head dim) on an empty probe tensor.
    probe = torch.empty(0, 0, 1, head_dim, device=device)
    return resolve_backend(backend, probe), None


def check_sizes(
    seq: int, batch: int, heads: int, kv_heads: int, head_dim: int, chunk: int, topk: int, seed: int = 0
) -> None:
    """Every size a positive integer within the kernels' int32 range, and a seed generators accept."""
    for name, value in (("--seq", seq), ("--batch", batch), ("--heads", heads), ("--kv-heads", kv_heads),
                        ("--head-dim", head_dim), ("--chunk", chunk), ("--topk", topk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MobaError(f"{name} must be a positive integer, got {value!r}")
        check_at_most(value, name)
    check_at_most(batch * seq, "--batch x --seq (tokens in all)")
    check_seed(seed)
    if heads % kv_heads != 0:
        raise MobaError(f"--kv-heads ({kv_heads}) must divide --heads ({heads}) (MHA, GQA or MQA)")


def random_qkv(setup: CompareSetup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded ``randn`` q ``[B, S, Hq, D]``, k/v ``[B, S, Hkv, D]`` drawn on the target device.

    The same seed gives the same tensors on the same device type (CPU and CUDA generators differ).
    """
    g = torch.Generator(device=setup.device).manual_seed(setup.seed)
    shape_q = (setup.batch, setup.seq, setup.heads, setup.head_dim)
    shape_kv = (setup.batch, setup.seq, setup.kv_heads, setup.head_dim)
    return tuple(
        torch.randn(s, generator=g, device=setup.device, dtype=torch.float32).to(setup.dtype)
        for s in (shape_q, shape_kv, shape_kv)
    )  # type: ignore[return-value]


def load_qkv(path: Path | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read tensors ``q``, ``k``, ``v`` from a safetensors file, as ``[B, S, H, D]`` (``[S, H, D]`` gains B=1).

    Any problem (missing file, not safetensors, missing names, inconsistent shapes) is one MobaError.
    """
    path = Path(path)
    if path.is_dir():
        raise MobaError(f"--qkv {path} is a folder; give a safetensors file")
    if not path.is_file():
        raise MobaError(f"--qkv file not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            missing = [n for n in ("q", "k", "v") if n not in names]
            if missing:
                have = ", ".join(sorted(names)) or "none"
                raise MobaError(
                    f"{path} has no tensor named {', '.join(missing)}; it needs q, k and v (it has: {have})"
                )
            q, k, v = (f.get_tensor(n) for n in ("q", "k", "v"))
    except MobaError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise MobaError(f"cannot read {path} as a safetensors file: {e}") from None
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() not in (3, 4):
            raise MobaError(f"tensor {name} in {path} must be [B, S, H, D] or [S, H, D], got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise MobaError(f"tensor {name} in {path} must be floating point, got {t.dtype}")
    if not (q.dim() == k.dim() == v.dim()):
        raise MobaError(f"q, k and v in {path} must have the same rank, got {q.dim()}, {k.dim()}, {v.dim()}")
    if q.dim() == 3:
        q, k, v = q[None], k[None], v[None]
    if k.shape != v.shape:
        raise MobaError(f"k and v in {path} must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise MobaError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} in {path} must agree on batch, sequence and head dim"
        )
    if min(q.shape) < 1 or min(k.shape) < 1:
        raise MobaError(f"tensors in {path} must not be empty, got q {tuple(q.shape)}")
    if q.shape[2] % k.shape[2] != 0:
        raise MobaError(f"q has {q.shape[2]} heads, not a multiple of k's {k.shape[2]} heads ({path})")
    check_finite({"q": q, "k": k, "v": v}, f"--qkv {path}")
    return q, k, v


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """One MobaError naming the first tensor that holds NaN or inf: the comparison needs finite inputs.

    Without this a NaN input reaches the equivalence check as a failure with a meaningless error figure.
    """
    for name, t in tensors.items():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            nan = int(torch.isnan(t).sum())
            first = tuple(int(i) for i in bad.nonzero()[0].tolist())
            raise MobaError(
                f"{where}: tensor {name} has {nan} NaN and {int(bad.sum()) - nan} infinite values (first at index "
                f"{first}); MoBA and full attention need finite inputs (values past the dtype's range overflow "
                "to infinity)"
            )


def file_dtype(q: torch.Tensor) -> torch.dtype | None:
    """The file's dtype when the kernels support it, else None (the device default is used)."""
    return q.dtype if q.dtype in SUPPORTED_DTYPES else None
