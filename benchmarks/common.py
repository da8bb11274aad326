"""Helpers shared by the GPU probes in this folder: the preset shapes, random inputs, timing, a per-stage
split of GPU kernel time (torch.profiler, by kernel name) and the result file.

The probes call only the public op (:func:`moba_cli.moba_attention`) and the documented ``MOBA_*`` kernel
switches, so they keep working when the kernels' internals move.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python benchmarks/<probe>.py`


@dataclass(frozen=True)
class Shape:
    """One MoBA call: q ``[batch, seq, heads, head_dim]``, k/v with ``kv_heads``; bf16 on the GPU."""

    seq: int
    heads: int
    kv_heads: int
    chunk: int
    topk: int
    head_dim: int = 128
    batch: int = 1


# The presets of `moba bench` at the sizes the README reports.
SHAPES = {
    "paper-1m": Shape(seq=1 << 20, heads=1, kv_heads=1, chunk=4096, topk=12),
    "paper-128k-h8": Shape(seq=1 << 17, heads=8, kv_heads=8, chunk=4096, topk=12),
    "flashmoba-512k": Shape(seq=1 << 19, heads=16, kv_heads=16, chunk=128, topk=8),
    "gqa-128k": Shape(seq=1 << 17, heads=32, kv_heads=8, chunk=4096, topk=12),
    "10m": Shape(seq=10 * (1 << 20), heads=1, kv_heads=1, chunk=10 * (1 << 20) // 64, topk=3),
}

# Kernel name -> stage. Names are matched in order; the first hit wins.
STAGES = [
    ("gate", re.compile(r"gate|block_mean", re.I)),
    ("moba attention", re.compile(r"_fwd_kernel|_bwd|dkdv|_dq|delta|gluon", re.I)),
    ("gather / merge", re.compile(r"gather|merge|lse", re.I)),
    ("cuDNN", re.compile(r"cudnn|fmha|flash|sm90_xmma|cutlass", re.I)),
    ("sort / schedule", re.compile(r"sort|scan|search|cumsum|bincount|histogram|pack_keys", re.I)),
]


def parse_shapes(text: str) -> dict[str, Shape]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(f"error: unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    return {n: SHAPES[n] for n in names}


def need_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("error: this probe needs a CUDA GPU")


def inputs(shape: Shape, grad: bool = False, seed: int = 0) -> list[torch.Tensor]:
    """Random bf16 q, k, v on the GPU (``requires_grad`` when ``grad``)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [
        torch.randn(shape.batch, shape.seq, h, shape.head_dim, device="cuda", dtype=torch.bfloat16,
                    generator=g).requires_grad_(grad)
        for h in (shape.heads, shape.kv_heads, shape.kv_heads)
    ]


def call(shape: Shape, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool) -> Callable[[], None]:
    """The public MoBA call (and its backward against a fixed gradient when ``backward``)."""
    from moba_cli import moba_attention

    dout = torch.randn_like(q) if backward else None

    def run() -> None:
        out = moba_attention(q, k, v, chunk_size=shape.chunk, topk=shape.topk)
        if dout is not None:
            q.grad = k.grad = v.grad = None
            out.backward(dout)

    return run


def median_ms(fn: Callable[[], None], rep_ms: int = 300) -> float:
    """Median milliseconds of ``fn`` (triton's do_bench: warm-up, L2 flushed before each call)."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def event_times(fn: Callable[[], object], runs: int = 5, flush: torch.Tensor | None = None) -> list[float]:
    """Milliseconds of ``runs`` calls of ``fn``, CUDA events around each and a sync after it (after one
    warm-up call); ``flush``: a buffer zeroed before each call (an L2 flush)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        if flush is not None:
            flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return times


def stage_times(fn: Callable[[], None], calls: int = 5) -> tuple[dict[str, float], list[dict]]:
    """GPU kernel milliseconds per call of ``fn``, by stage and by kernel (profiled after one warm call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    from torch.autograd import DeviceType

    kernels: dict[str, float] = {}
    for evt in prof.key_averages():
        # device-side events only (kernels, copies, fills); a host op's device time would count them twice
        if evt.device_type != DeviceType.CUDA or evt.self_device_time_total <= 0:
            continue
        kernels[evt.key] = kernels.get(evt.key, 0.0) + evt.self_device_time_total / 1000 / calls
    stages: dict[str, float] = {}
    for name, ms in kernels.items():
        stage = next((s for s, pattern in STAGES if pattern.search(name)), "other (layout, copies, fills)")
        stages[stage] = stages.get(stage, 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    return stages, [{"kernel": k[:160], "ms": ms} for k, ms in top]


def shape_record(name: str, shape: Shape) -> dict:
    return {"shape": name, **asdict(shape)}


def write(kind: str, config: dict, records: list[dict], summary: dict) -> Path:
    """One moba-result/1 file in ``$OUT`` (default ./scratch); returns its path."""
    from moba_cli.results import make_result, write_result

    return write_result(make_result(kind, config, records, summary), os.environ.get("OUT", "scratch"), "scratch")
