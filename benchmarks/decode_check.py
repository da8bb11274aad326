#!/usr/bin/env python
"""GPU check of MoBA decode (``moba_decode``): correctness against the float32 reference, then timing and
bytes read against dense decode (SDPA with one query), for MHA 32/32, GQA 32/8 and MQA 32/1, D=128, bf16.

    python benchmarks/decode_check.py                 # 128k, 512k, 1m; chunk 4096/topk 12 and 512/8
    python benchmarks/decode_check.py --lengths 128k --sweep   # also tries kernel launch settings

Writes ``$OUT/decode-check-<time>.json`` (moba-result schema) and prints one line per case. Times are
medians over ``--iters`` calls with the L2 cache flushed before each call: ``graph`` replays a CUDA graph
of the call (GPU time), ``eager`` is the plain call (includes the Python launches and the host sync of the
``cache_seqlens`` range check). Bytes are what each op must read: for MoBA the chosen blocks' K and V (the
union over each KV group's heads, as the kernel reads them) plus the block means scored by the gate; for
dense the whole cache. ``%copy`` compares the achieved rate with a 4.25 TB/s device copy.
About 2-4 minutes on an H200 (the 1M MHA cache alone is 16 GiB).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moba_cli.ops.moba.decode import (  # noqa: E402
    cache_block_means,
    moba_decode,
    select_decode_blocks,
)
from moba_cli.ops.moba.triton_decode import dense_decode_triton, moba_decode_triton  # noqa: E402
from moba_cli.results import make_result, write_result  # noqa: E402
from moba_cli.utils.sizes import format_size, parse_size_list  # noqa: E402

COPY_GBPS = 4250.0
HEADS = (("mha", 32, 32), ("gqa", 32, 8), ("mqa", 32, 1))
GATES = ((4096, 12), (512, 8))
D = 128
DTYPE = torch.bfloat16


def bench(fn, iters: int, flush: torch.Tensor) -> float:
    """Median microseconds of ``fn()`` with a cold L2 before every call."""
    times = []
    if not flush.is_cuda:  # --cpu-smoke: wall time, only to exercise the script
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
        return statistics.median(times)
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)


def graphed(fn):
    """A CUDA graph of one call of ``fn`` (after warm-up calls), returned as its replay function."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_both(fn, iters: int, flush: torch.Tensor) -> tuple[float, float | None, str | None]:
    fn()
    if not flush.is_cuda:
        return bench(fn, iters, flush), None, "no CUDA graphs on CPU"
    torch.cuda.synchronize()
    eager = bench(fn, iters, flush)
    try:
        graph_us = bench(graphed(fn), iters, flush)
        return eager, graph_us, None
    except Exception as e:  # noqa: BLE001 - a capture failure is reported, the eager number still stands
        torch.cuda.synchronize()
        return eager, None, f"{type(e).__name__}: {e}"[:300]


def moba_bytes(plan: dict, seqlens: torch.Tensor, chunk: int, hkv: int, elt: int) -> tuple[int, int]:
    """(K+V bytes of the union blocks, block-mean bytes the gate reads)."""
    union, count = plan["union"].long(), plan["count"].long()  # [B, Hkv, U], [B, Hkv]
    u = torch.arange(union.shape[-1], device=union.device)
    live = u[None, None, :] < count[..., None]
    n = seqlens.long()[:, None, None]
    start = union * chunk
    keys = torch.where(live, torch.minimum(start + chunk, n) - start, 0).sum().item()
    past = ((seqlens.long() - 1) // chunk).sum().item()
    return int(keys) * D * elt * 2, int(past) * hkv * D * 4


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_batch(dev: str, gates, cache_len: int) -> list[dict]:
    """Different lengths per sequence and a topk that covers every block (== dense SDPA), vs references."""
    rows = []
    gen = torch.Generator(device=dev).manual_seed(1)
    hq, hkv = 32, 8
    chunk0 = gates[0][0]
    lens = torch.tensor([cache_len, cache_len * 5 // 8 + 3, chunk0 + 1, 1], dtype=torch.int32, device=dev)
    k = torch.randn(4, hkv, cache_len, D, generator=gen, device=dev, dtype=DTYPE)
    v = torch.randn(4, hkv, cache_len, D, generator=gen, device=dev, dtype=DTYPE)
    q = torch.randn(4, hq, D, generator=gen, device=dev, dtype=DTYPE)
    kc, vc = k.transpose(1, 2), v.transpose(1, 2)
    for chunk, topk in (*gates, (chunk0, math.ceil(cache_len / chunk0))):
        means = cache_block_means(kc, lens, chunk)
        out, plan = moba_decode_triton(q, kc, vc, lens, means, chunk, topk, D**-0.5, return_plan=True)
        ref = moba_decode(q, kc, vc, lens, means, chunk_size=chunk, topk=topk, backend="naive")
        ids = select_decode_blocks(q, means, lens, chunk, topk, cache_len)
        row = {
            "case": "batch-varlen", "cache_len": cache_len, "lens": lens.tolist(), "hq": hq, "hkv": hkv,
            "chunk": chunk, "topk": topk, "rel_err_vs_ref": rel_err(out, ref),
            "ids_match": (plan["block_ids"] == ids).float().mean().item(), "nan": bool(out.isnan().any()),
        }
        if topk * chunk >= cache_len:
            dense = torch.stack([
                torch.nn.functional.scaled_dot_product_attention(
                    q[b, :, None].float(), k[b, :, : int(n)].float(), v[b, :, : int(n)].float(), enable_gqa=True
                )[:, 0]
                for b, n in enumerate(lens.tolist())
            ])
            row["rel_err_vs_dense_fp32"] = rel_err(out, dense)
        rows.append(row)
        print(f"  batch lens={lens.tolist()} chunk={chunk} topk={topk}: rel_err={row['rel_err_vs_ref']:.2e} "
              f"ids_match={row['ids_match']:.4f}"
              + (f" vs dense={row['rel_err_vs_dense_fp32']:.2e}" if "rel_err_vs_dense_fp32" in row else ""))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="128k,512k,1m")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="also time a few kernel launch settings (MoBA only)")
    ap.add_argument("--out", default=os.environ.get("OUT", "scratch"))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU (Triton interpreter), no timing")
    args = ap.parse_args()
    global D, DTYPE
    gates = GATES
    if args.cpu_smoke:
        # Exercises every line of the script without a GPU; the numbers mean nothing.
        dev, lengths, gates, D, DTYPE = "cpu", [160, 96], ((32, 3), (16, 2)), 32, torch.float16
        args.iters, check_len = 1, 96
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("error: --cpu-smoke needs TRITON_INTERPRET=1 in the environment")
            return 1
    elif not torch.cuda.is_available():
        print("error: this script needs a CUDA GPU (or --cpu-smoke with TRITON_INTERPRET=1)")
        return 1
    else:
        dev, lengths, check_len = "cuda", parse_size_list(args.lengths), 65536
    torch.backends.cuda.matmul.allow_tf32 = False
    flush = torch.empty(512 * 2**20 if dev == "cuda" else 1, dtype=torch.uint8, device=dev)
    t0 = time.time()
    records: list[dict] = []
    print(f"correctness, batch of different lengths (GQA 32/8, {format_size(check_len)} cache):")
    checks = check_batch(dev, gates, check_len)
    hdr = (f"{'L':>5} {'heads':5} {'chunk':>5} {'k':>3} {'moba_us':>8} {'eager':>8} {'sdpa_us':>9} {'eager':>8} "
           f"{'flash_us':>9} {'speedup':>7} {'moba_MB':>8} {'dense_MB':>9} {'moba_GB/s':>9} {'%copy':>6} "
           f"{'sdpa_GB/s':>9} {'%copy':>6} {'flash_GB/s':>10} {'rel_err':>8} {'ids':>6}")
    print("moba/sdpa/flash: graph-replay GPU us (eager: plain call); flash = our split-KV kernels over every "
          "block; speedup = best dense / moba")
    print(hdr)
    for cache_len in lengths:
        for name, hq, hkv in HEADS:
            gen = torch.Generator(device=dev).manual_seed(cache_len + hkv)
            # transformers' cache layout [B, Hkv, L, D]; MoBA reads it through a transposed view.
            k = torch.randn(1, hkv, cache_len, D, generator=gen, device=dev, dtype=DTYPE)
            v = torch.randn(1, hkv, cache_len, D, generator=gen, device=dev, dtype=DTYPE)
            q = torch.randn(1, hq, D, generator=gen, device=dev, dtype=DTYPE)
            kc, vc = k.transpose(1, 2), v.transpose(1, 2)
            seqlens = torch.tensor([cache_len], dtype=torch.int32, device=dev)
            q4 = q[:, :, None]

            def dense(q4=q4, k=k, v=v, gqa=hq != hkv):
                return torch.nn.functional.scaled_dot_product_attention(q4, k, v, enable_gqa=gqa)

            dense_eager, dense_graph, dense_err = time_both(dense, args.iters, flush)
            dense_bytes = cache_len * hkv * D * 2 * 2

            def flash(q=q, kc=kc, vc=vc, seqlens=seqlens):
                return dense_decode_triton(q, kc, vc, seqlens, D**-0.5)

            # Our split-KV kernels over every block: a flash-decoding dense baseline (SDPA may not split KV).
            flash_eager, flash_graph, _ = time_both(flash, args.iters, flush)
            flash_err = rel_err(flash(), dense()[:, :, 0])  # SDPA gives [B, Hq, 1, D]
            for chunk, topk in gates:
                sync(dev)
                tm = time.time()
                means = cache_block_means(kc, seqlens, chunk)
                sync(dev)
                means_ms = (time.time() - tm) * 1000

                def moba(means=means, chunk=chunk, topk=topk, q=q, kc=kc, vc=vc, seqlens=seqlens):
                    return moba_decode(q, kc, vc, seqlens, means, chunk_size=chunk, topk=topk)

                out, plan = moba_decode_triton(q, kc, vc, seqlens, means, chunk, topk, D**-0.5, return_plan=True)
                ref = moba_decode(q, kc, vc, seqlens, means, chunk_size=chunk, topk=topk, backend="naive")
                ids = select_decode_blocks(q, means, seqlens, chunk, topk, cache_len)
                kv_b, means_b = moba_bytes(plan, seqlens, chunk, hkv, 2)
                m_eager, m_graph, m_err = time_both(moba, args.iters, flush)
                mb = kv_b + means_b
                t_m = m_graph or m_eager
                t_d = dense_graph or dense_eager
                t_f = flash_graph or flash_eager
                rec = {
                    "cache_len": cache_len, "heads": name, "hq": hq, "hkv": hkv, "head_dim": D, "dtype": str(DTYPE),
                    "chunk": chunk, "topk": topk, "blocks": math.ceil(cache_len / chunk),
                    "union_blocks_per_group": plan["count"].float().mean().item(),
                    "n_split": plan["n_split"], "split_n": plan["split_n"],
                    "moba_us_graph": m_graph, "moba_us_eager": m_eager, "moba_graph_error": m_err,
                    "dense_us_graph": dense_graph, "dense_us_eager": dense_eager, "dense_graph_error": dense_err,
                    "dense_triton_us_graph": flash_graph, "dense_triton_us_eager": flash_eager,
                    "dense_triton_rel_err_vs_sdpa": flash_err,
                    "speedup_graph": (dense_graph / m_graph) if (m_graph and dense_graph) else None,
                    "speedup_eager": dense_eager / m_eager,
                    "speedup_vs_best_dense": min(t_d, t_f) / t_m,
                    "moba_bytes": mb, "moba_kv_bytes": kv_b, "moba_means_bytes": means_b, "dense_bytes": dense_bytes,
                    "byte_ratio": dense_bytes / mb,
                    "moba_GBps": mb / t_m / 1e3, "dense_GBps": dense_bytes / t_d / 1e3,
                    "dense_triton_GBps": dense_bytes / t_f / 1e3,
                    "moba_pct_copy": 100 * mb / t_m / 1e3 / COPY_GBPS,
                    "dense_pct_copy": 100 * dense_bytes / t_d / 1e3 / COPY_GBPS,
                    "rel_err_vs_ref": rel_err(out, ref), "ids_match": (plan["block_ids"] == ids).float().mean().item(),
                    "nan": bool(out.isnan().any()), "block_means_ms": means_ms,
                }
                if args.sweep:
                    rec["sweep"] = sweep(q, kc, vc, seqlens, means, chunk, topk, args.iters, flush)
                records.append(rec)
                print(f"{format_size(cache_len):>5} {name:5} {chunk:>5} {topk:>3} {t_m:8.1f} {m_eager:8.1f} "
                      f"{t_d:9.1f} {dense_eager:8.1f} {t_f:9.1f} {min(t_d, t_f) / t_m:7.1f} {mb / 1e6:8.1f} "
                      f"{dense_bytes / 1e6:9.1f} {rec['moba_GBps']:9.0f} {rec['moba_pct_copy']:6.1f} "
                      f"{rec['dense_GBps']:9.0f} {rec['dense_pct_copy']:6.1f} {rec['dense_triton_GBps']:10.0f} "
                      f"{rec['rel_err_vs_ref']:8.1e} {rec['ids_match']:6.3f}"
                      + (f"  [graph failed: {m_err}]" if m_err else ""))
                del means, out, ref
            del k, v, kc, vc
            if dev == "cuda":
                torch.cuda.empty_cache()
    ok = all(r["rel_err_vs_ref"] < 2e-2 and not r["nan"] for r in records + checks) and all(
        r["dense_triton_rel_err_vs_sdpa"] < 2e-2 for r in records
    )
    summary = {
        "all_close_to_reference": ok,
        "min_ids_match": min(r["ids_match"] for r in records + checks),
        "seconds": time.time() - t0,
    }
    for r in records:
        key = f"{format_size(r['cache_len'])}-{r['heads']}-c{r['chunk']}k{r['topk']}"
        summary[f"speedup_{key}"] = r["speedup_vs_best_dense"]
    config = {"lengths": lengths, "heads": HEADS, "gates": gates, "head_dim": D, "dtype": str(DTYPE),
              "iters": args.iters, "copy_GBps": COPY_GBPS, "sweep": args.sweep, "device": dev}
    result = make_result("decode-check", config, records + checks, summary)
    path = write_result(result, args.out, "results/decode-check")
    print(f"all close to the float32 reference: {ok}; min block-choice agreement "
          f"{summary['min_ids_match']:.4f}; {summary['seconds']:.0f} s; wrote {path}")
    return 0 if ok else 2


def sweep(q, kc, vc, seqlens, means, chunk, topk, iters, flush) -> list[dict]:
    """GPU time of the Triton path under a few launch settings (defaults first)."""
    rows = []
    scale = q.shape[-1] ** -0.5
    sms = torch.cuda.get_device_properties(0).multi_processor_count if q.is_cuda else 1
    for block_n, warps, stages, target in (
        (None, 4, None, None), (32, 4, 3, None), (64, 4, 2, None), (64, 8, 3, None), (128, 8, 2, None),
        (64, 4, 3, 4 * sms), (64, 4, 3, 16 * sms), (64, 4, 4, 32 * sms),
    ):
        knobs = {"block_n": block_n, "num_warps": warps, "num_stages": stages, "target_programs": target}

        def fn(knobs=knobs):
            return moba_decode_triton(q, kc, vc, seqlens, means, chunk, topk, scale, **knobs)

        try:
            _, us, err = time_both(fn, iters, flush)
        except Exception as e:  # noqa: BLE001 - a setting that does not compile is reported, not fatal
            us, err = None, f"{type(e).__name__}: {e}"[:200]
        rows.append({**knobs, "us_graph": us, "error": err})
    best = min((r for r in rows if r["us_graph"]), key=lambda r: r["us_graph"], default=None)
    if best:
        print(f"      sweep best: {best}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
