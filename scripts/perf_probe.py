"""Kernel-development probe (not the user benchmark; that is `moba bench`): times each stage of the
Triton MoBA op against cuDNN SDPA at a few shapes and writes JSON under $OUT (or ./scratch).

python scripts/perf_probe.py [--quick]
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import triton

from moba_cli.ops.moba import triton_moba as tm
from moba_cli.ops.moba.layout import make_layout

OUT = os.environ.get("OUT", "scratch")


def bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def sdpa_fn(q, k, v, backend):
    from torch.nn.attention import sdpa_kernel

    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))

    def f():
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(
                qt, kt, vt, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]
            )

    return f


def case(seq, hq, hkv, chunk, topk, bwd=True):
    from torch.nn.attention import SDPBackend

    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(seq, hq, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(seq, hkv, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn(seq, hkv, 128, device=dev, dtype=torch.bfloat16)
    cu = torch.tensor([0, seq], dtype=torch.int32, device=dev)
    layout = make_layout(cu, chunk)
    rec = {"seq": seq, "heads": hq, "kv_heads": hkv, "chunk": chunk, "topk": topk}
    scale = 128**-0.5
    rec["gate_ms"] = bench(lambda: tm.select_blocks(q, k, layout, topk))
    sel = tm.select_blocks(q, k, layout, topk)
    cfg = tm._fwd_config(128, q.dtype, chunk)
    rec["sched_ms"] = bench(lambda: tm.Schedule(sel, layout.num_blocks, cfg["BLOCK_M"]))
    sched = tm.Schedule(sel, layout.num_blocks, cfg["BLOCK_M"])
    rec["attn_fwd_ms"] = bench(lambda: tm._forward(q, k, v, layout, sched, scale))
    rec["moba_fwd_ms"] = bench(lambda: tm.moba_attention_triton(q, k, v, layout, topk))
    pairs = int(sched.pair_t.numel())
    # attended (q, k) pairs from the real selection: past blocks full, own block causal
    own = float(sum(min(chunk, seq - s) * (min(chunk, seq - s) + 1) / 2 for s in range(0, seq, chunk))) * hq
    past = (pairs - seq * hq) * chunk
    rec["attended_pairs"] = own + past
    rec["fwd_tflops"] = 4 * 128 * rec["attended_pairs"] / rec["moba_fwd_ms"] / 1e9
    rec["cudnn_fwd_ms"] = bench(sdpa_fn(q, k, v, SDPBackend.CUDNN_ATTENTION))
    rec["fwd_speedup"] = rec["cudnn_fwd_ms"] / rec["moba_fwd_ms"]
    if bwd:
        bcfg = tm._bwd_config(128, q.dtype, tm.bwd_fused())
        bsched = tm.Schedule(sel, layout.num_blocks, bcfg["BLOCK_M"])
        out, lse = tm._forward(q, k, v, layout, bsched, scale)
        do = torch.randn_like(out)
        lists = tm.BwdLists(sel, layout.num_blocks)
        rec["attn_bwd_ms"] = bench(lambda: tm._backward(q, k, v, out, do, lse, layout, lists, bsched, scale,
                                                       tm.bwd_fused()))
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

        def fb():
            o = tm.moba_attention_triton(qg, kg, vg, layout, topk)
            o.backward(do)

        rec["moba_fwdbwd_ms"] = bench(fb)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fb()
        torch.cuda.synchronize()
        rec["moba_fwdbwd_peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        f = sdpa_fn(qg, kg, vg, SDPBackend.CUDNN_ATTENTION)

        def db():
            f().backward(do.transpose(0, 1)[None])

        rec["cudnn_fwdbwd_ms"] = bench(db)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        db()
        torch.cuda.synchronize()
        rec["cudnn_fwdbwd_peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        rec["fwdbwd_speedup"] = rec["cudnn_fwdbwd_ms"] / rec["moba_fwdbwd_ms"]
    return rec


def main():
    quick = "--quick" in sys.argv
    cases = [
        (32768, 1, 1, 4096, 12, True),
        (131072, 1, 1, 4096, 12, True),
        (131072, 16, 16, 128, 8, True),
        (1048576, 1, 1, 4096, 12, True),
        (524288, 16, 16, 128, 8, not quick),
        (131072, 32, 8, 4096, 12, not quick),
    ]
    recs = []
    for c in cases:
        t0 = time.time()
        try:
            r = case(*c)
        except Exception as e:  # keep going: this is a probe
            r = {"case": c, "error": repr(e)[:2000]}
        r["wall_s"] = round(time.time() - t0, 1)
        recs.append(r)
        print(json.dumps(r), flush=True)
        torch.cuda.empty_cache()
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "perf_probe.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(0), "records": recs}, f, indent=1)


if __name__ == "__main__":
    main()
