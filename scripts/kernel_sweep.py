"""Kernel-development sweep: times launch configurations of the gate, forward and backward kernels at
the paper (chunk 4096, topk 12, 1M, 1 head) and FlashMoBA (chunk 128, topk 8, 512K, 16 heads) shapes.
Writes $OUT/kernel_sweep.json and prints the best configuration of each kernel.
"""

from __future__ import annotations

import json
import os

import torch
import triton

from moba_cli.ops.moba import triton_moba as tm
from moba_cli.ops.moba.layout import make_layout

OUT = os.environ.get("OUT", "scratch")


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def inputs(seq, hq, chunk, topk):
    torch.manual_seed(0)
    q, k, v = (torch.randn(seq, hq, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    layout = make_layout(torch.tensor([0, seq], dtype=torch.int32, device="cuda"), chunk)
    return q, k, v, layout, tm.select_blocks(q, k, layout, topk)


def timed(name, cfg, fn, recs):
    try:
        ms = bench(fn)
    except Exception as e:  # a config that does not compile (shared memory) is just skipped
        ms = None
        print(name, cfg, "failed", repr(e)[:200])
    recs.append({"kernel": name, "cfg": cfg, "ms": ms})
    print(name, cfg, ms, flush=True)


SHAPES = {"paper-1m": (1 << 20, 1, 4096, 12), "flashmoba-512k": (1 << 19, 16, 128, 8)}
FWD = ["128,64,8,3", "64,64,4,3", "64,32,4,3", "64,64,4,4"]
BWD = ["64,64,4,2", "64,32,4,2", "32,32,4,2"]
GATE = ["64,16,4", "128,16,8", "128,16,4", "64,32,4", "256,16,8", "128,32,8"]


def sweep_shape(label, seq, hq, chunk, topk, recs):
    scale = 128**-0.5
    q, k, v, layout, sel = inputs(seq, hq, chunk, topk)
    for cfg in FWD:
        os.environ["MOBA_FWD_CFG"] = cfg
        sched = tm.Schedule(sel, layout.num_blocks, int(cfg.split(",")[0]))
        timed(f"fwd/{label}", cfg, lambda sched=sched: tm._forward(q, k, v, layout, sched, scale), recs)
    os.environ.pop("MOBA_FWD_CFG")
    sched = tm.Schedule(sel, layout.num_blocks, tm._fwd_config(128, q.dtype, chunk)["BLOCK_M"])
    out, lse = tm._forward(q, k, v, layout, sched, scale)
    do = torch.randn_like(out)
    lists = tm.BwdLists(sel, layout.num_blocks)
    for cfg in BWD:
        os.environ["MOBA_BWD_CFG"] = cfg
        bs = tm.Schedule(sel, layout.num_blocks, int(cfg.split(",")[0]))
        timed(f"bwd/{label}", cfg,
              lambda bs=bs: tm._backward(q, k, v, out, do, lse, layout, lists, bs, scale, tm.bwd_fused()), recs)
    os.environ.pop("MOBA_BWD_CFG")
    for cfg in GATE:
        os.environ["MOBA_GATE_CFG"] = cfg
        timed(f"gate/{label}", cfg, lambda: tm.select_blocks(q, k, layout, topk), recs)
    os.environ.pop("MOBA_GATE_CFG")


def main():
    recs = []
    for label, shape in SHAPES.items():
        sweep_shape(label, *shape, recs)
        torch.cuda.empty_cache()
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "kernel_sweep.json"), "w") as f:
        json.dump(recs, f, indent=1)
    best = {}
    for r in recs:
        if r["ms"] is not None and (r["kernel"] not in best or r["ms"] < best[r["kernel"]]["ms"]):
            best[r["kernel"]] = r
    for kname, r in best.items():
        print("BEST", kname, r["cfg"], round(r["ms"], 3))


if __name__ == "__main__":
    main()
