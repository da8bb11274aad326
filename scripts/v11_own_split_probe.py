"""v11 probe (H200): own blocks halved into causal halves plus one non-causal call per level
(``cudnn_blocks.OWN_SPLITS``), through the public call.

For each case and split level: forward time on the same inputs (min of 3 after a warm call), the own-block
part alone, and the output's difference from level 0. Then a CUDA-kernel breakdown of the 10M forward
(torch.profiler) at levels 0 and 2. JSON lines to $OUT/v11a/probe.jsonl.
"""

from __future__ import annotations

import os
import sys

import torch
from probe_lib import JsonLines, inputs, wall

from moba_cli import moba_attention
from moba_cli.ops.moba import cudnn_blocks, triton_moba

emit = JsonLines("v11a")
DEV = torch.device("cuda")


def own_part(x, chunk, splits):
    q, k, v = (y[0] for y in x)
    t, h, d = q.shape
    acc = torch.empty(t, h, d, device=DEV, dtype=torch.float32)
    lse = torch.empty(t, h, device=DEV, dtype=torch.float32)
    nb = t // chunk
    return lambda: cudnn_blocks._own_blocks(q, k, v, acc, lse, 0, nb, chunk, q.shape[-1] ** -0.5, splits)


def case(name, t, hq, hkv, chunk, topk, levels):
    x = inputs(t, hq, hkv, 0)
    base = None
    for splits in levels:
        cudnn_blocks.OWN_SPLITS = splits
        f = lambda: moba_attention(*x, chunk_size=chunk, topk=topk)  # noqa: E731
        out = f()
        ms = min(wall(f) for _ in range(3))
        g = own_part(x, chunk, splits)
        g()
        own_ms = min(wall(g) for _ in range(3))
        rec = {"name": name, "shape": [t, hq, hkv, chunk, topk], "splits": splits, "fwd_ms": ms, "own_ms": own_ms,
               "commit": os.environ.get("MOBA_GIT_COMMIT")}
        if base is None:
            base = out.float()
        else:
            diff = (out.float() - base)
            rec["max_abs_vs_0"] = diff.abs().max().item()
            rec["rel_rms_vs_0"] = (diff.pow(2).mean().sqrt() / base.pow(2).mean().sqrt()).item()
        del out
        emit(**rec)
        torch.cuda.empty_cache()
    cudnn_blocks.OWN_SPLITS = None


def breakdown(t, chunk, topk, splits):
    from torch.profiler import ProfilerActivity, profile

    cudnn_blocks.OWN_SPLITS = splits
    x = inputs(t, 1, 1, 0)
    moba_attention(*x, chunk_size=chunk, topk=topk)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        moba_attention(*x, chunk_size=chunk, topk=topk)
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if us:
            rows.append((us / 1e3, ev.count, ev.key[:120]))
    rows.sort(reverse=True)
    emit(breakdown=f"{t}/{chunk}/{topk}", splits=splits, total_ms=sum(r[0] for r in rows),
         kernels=[{"ms": round(a, 2), "n": n, "name": k} for a, n, k in rows[:25]])
    cudnn_blocks.OWN_SPLITS = None


CASES = {
    "10m": ((10 << 20, 1, 1, 163840, 3), (0, 1, 2, 3)),
    "4m-c65536": ((4 << 20, 1, 1, 65536, 3), (0, 1, 2, 3)),
    "2m-c32768-h4": ((2 << 20, 4, 4, 32768, 4), (0, 1, 2)),
    "1m-c32768-gqa": ((1 << 20, 8, 2, 32768, 4), (0, 1, 2)),
}

if __name__ == "__main__":
    emit(torch=torch.__version__, cudnn=torch.backends.cudnn.version(), gpu=torch.cuda.get_device_name())
    triton_moba.check_env_knobs()
    for name in sys.argv[1:] or list(CASES):
        args, levels = CASES[name]
        case(name, *args, levels)
    breakdown(10 << 20, 163840, 3, 0)
    breakdown(10 << 20, 163840, 3, 2)
