"""Kernel-development probe for issue 4: where the paper preset's forward time goes at 1M tokens (1 head),
each stage timed on its own with CUDA events (median of 20): layout, gate, schedule, attention slots plus
normalisation, and the whole public call. Writes $OUT/fwd_breakdown.json."""

from __future__ import annotations

import json
import os

import torch

from moba_cli import moba_attention
from moba_cli.ops.moba import triton_moba as tm
from moba_cli.ops.moba.layout import make_layout


def med(fn, n=20):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def main():
    seq, chunk, topk = 1 << 20, 4096, 12
    torch.manual_seed(0)
    q, k, v = (torch.randn(seq, 1, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, seq], dtype=torch.int32, device="cuda")
    layout = make_layout(cu, chunk)
    sel = tm.select_blocks(q, k, layout, topk)
    bm = tm._fwd_config(128, q.dtype, chunk)["BLOCK_M"]
    sched = tm.Schedule(sel, layout.num_blocks, bm)
    rec = {
        "layout_ms": med(lambda: make_layout(cu, chunk)),
        "gate_ms": med(lambda: tm.select_blocks(q, k, layout, topk)),
        "schedule_ms": med(lambda: tm.Schedule(sel, layout.num_blocks, bm)),
        "attention_ms": med(lambda: tm._forward(q, k, v, layout, sched, 128**-0.5)),
        "triton_fn_ms": med(lambda: tm.moba_attention_triton(q, k, v, layout, topk)),
        "public_call_ms": med(lambda: moba_attention(q[None], k[None], v[None], chunk_size=chunk, topk=topk)),
        "git_commit": os.environ.get("MOBA_GIT_COMMIT"),
    }
    print(json.dumps(rec))
    os.makedirs(os.environ.get("OUT", "scratch"), exist_ok=True)
    with open(os.path.join(os.environ.get("OUT", "scratch"), "fwd_breakdown.json"), "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
