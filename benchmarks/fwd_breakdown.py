"""Where a MoBA call's GPU time goes: each preset shape's public call (forward, and forward+backward with
``--pass fwd,fwd+bwd``) timed end to end, and its kernel time split by stage (gate, MoBA attention kernels,
gathers and log-sum-exp merges, cuDNN, sorts and schedule, the rest) from torch.profiler kernel names.

    python benchmarks/fwd_breakdown.py                       # paper-1m and flashmoba-512k, fwd
    python benchmarks/fwd_breakdown.py --shapes 10m,gqa-128k --pass fwd,fwd+bwd

Writes ``$OUT/fwd-breakdown-<time>-....json`` (moba-result/1: one record per shape, pass and stage, plus the
25 longest kernels in the summary). About a minute on an H100/H200 for the default shapes.
"""

from __future__ import annotations

import argparse

import torch
from common import SHAPES, call, inputs, median_ms, need_cuda, parse_shapes, shape_record, stage_times, write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="paper-1m,flashmoba-512k", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--pass", dest="passes", default="fwd", help="fwd, fwd+bwd or both (comma list)")
    args = ap.parse_args()
    passes = [p.strip() for p in args.passes.split(",") if p.strip()]
    if not passes or any(p not in ("fwd", "fwd+bwd") for p in passes):
        raise SystemExit("error: --pass takes fwd, fwd+bwd or fwd,fwd+bwd")
    shapes = parse_shapes(args.shapes)
    need_cuda()
    records, kernels = [], {}
    for name, shape in shapes.items():
        for pas in passes:
            backward = pas == "fwd+bwd"
            q, k, v = inputs(shape, grad=backward)
            fn = call(shape, q, k, v, backward)
            wall = median_ms(fn)
            stages, top = stage_times(fn)
            kernel_ms = sum(stages.values())
            for stage, ms in sorted(stages.items(), key=lambda kv: -kv[1]):
                records.append({**shape_record(name, shape), "pass": pas, "stage": stage, "ms": ms,
                                "share_of_kernels": ms / kernel_ms if kernel_ms else None, "call_ms": wall})
                print(f"{name:>15} {pas:>7} {stage:>30} {ms:9.3f} ms", flush=True)
            print(f"{name:>15} {pas:>7} {'whole call (median)':>30} {wall:9.3f} ms; kernels {kernel_ms:.3f} ms")
            kernels[f"{name}/{pas}"] = top
            del q, k, v, fn
            torch.cuda.empty_cache()
    path = write("fwd-breakdown", {"shapes": list(shapes), "passes": passes}, records, {"top_kernels": kernels})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
