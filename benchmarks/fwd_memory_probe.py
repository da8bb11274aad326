"""Inference forward: time and peak memory above the inputs, MoBA (by piece budget) against cuDNN.

Usage: [BUDGETS=-1,0.12] python benchmarks/fwd_memory_probe.py OUT.json [case ...]; cases: paper-1m,
flashmoba-512k, gqa-128k, paper-128k-h8. Peak: torch.cuda.max_memory_allocated above what was allocated
before the call (as moba bench's peak_mem_bytes); time: median of CUDA-event timings after a warm-up.
Each MoBA output is checked for finiteness and against the first budget's (rel RMS).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys

import torch
import triton
from common import event_times

from moba_cli import moba_attention

CASES = {
    # name: seq, heads, kv heads, chunk, topk
    "paper-1m": (2**20, 1, 1, 4096, 12),
    "flashmoba-512k": (2**19, 16, 16, 128, 8),
    "gqa-128k": (2**17, 32, 8, 4096, 12),
    "paper-128k-h8": (2**17, 8, 8, 4096, 12),
}


def measure(fn, repeats: int = 5):
    torch.cuda.synchronize()
    fn()  # warm-up (compiles)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return statistics.median(event_times(fn, repeats)), peak


def run_case(name: str) -> dict:
    seq, hq, hkv, chunk, topk = CASES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, seq, hq, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, seq, hkv, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, seq, hkv, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    rec: dict = {"case": name, "seq": seq, "heads": hq, "kv_heads": hkv, "chunk": chunk, "topk": topk}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn():
        with torch.no_grad(), sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                        enable_gqa=hq != hkv)

    ms, peak = measure(cudnn, 3)
    rec["cudnn"] = {"ms": ms, "peak_bytes": peak}
    outs = {}
    # BUDGETS: KernelOptions.fwd_piece_budget values of the lean forward to time (-1: the default forward);
    # "base" times a tree without KernelOptions
    budgets = [b if b == "base" else float(b) for b in os.environ.get("BUDGETS", "-1,0.12").split(",")]
    for budget in budgets:
        kw = {}
        if budget != "base":
            from moba_cli.ops.moba import KernelOptions

            # a negative budget: the default (not lean) inference forward
            kw["options"] = KernelOptions.from_env().replace(fwd_lean=budget >= 0, fwd_piece_budget=max(budget, 0.0))

        def moba(kw=kw):
            with torch.no_grad():
                return moba_attention(q, k, v, chunk_size=chunk, topk=topk, **kw)

        ms, peak = measure(moba)
        outs[budget] = moba()
        rec[f"moba_budget_{budget}"] = {
            "ms": ms, "peak_bytes": peak, "speedup_vs_cudnn": rec["cudnn"]["ms"] / ms,
            "peak_vs_cudnn": peak / rec["cudnn"]["peak_bytes"], "finite": bool(torch.isfinite(outs[budget]).all()),
        }
    if len(budgets) > 1:
        a, b = outs[budgets[0]].float(), outs[budgets[-1]].float()
        # (named when the first budget was the lean forward in one piece; it compares the first and last budget)
        rec["pieces_vs_one_piece_rel_rms"] = ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()
    print(json.dumps(rec), flush=True)
    return rec


def main() -> None:
    path = sys.argv[1]
    names = sys.argv[2:] or list(CASES)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(),
           "git_commit": os.environ.get("MOBA_GIT_COMMIT", "unknown")}
    recs = []
    for n in names:
        recs.append(run_case(n))
        torch.cuda.empty_cache()
        with open(path, "w") as f:
            json.dump({"env": env, "command": " ".join(sys.argv), "records": recs}, f, indent=1)


if __name__ == "__main__":
    main()
