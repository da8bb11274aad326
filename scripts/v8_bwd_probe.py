"""Kernel-development probe for issue 4, kernel v8: the fused backward's gathered-row pipelining.

Triton 3.6 pipelines the dK/dV loop's loads, but the rows of Q and dO are gathered through the token
index loaded in the same iteration (``PAIR_T``), and for such a chain it issues the next tile's rows at
the end of an iteration and waits for all of them at the top of the next (``async_wait num = 0``, a
2-deep buffer at any ``num_stages``): every tile waits one full load latency. The variant ``tpf`` loads
the next tile's indices one iteration ahead (a loop-carried value), so the rows become a direct load
that the pipeliner can issue ``num_stages - 1`` tiles ahead.

Times the backward alone (median of CUDA-event timings) at the paper preset, 1M x 1 head and 128K x 8
heads, for the committed kernel and the variant at 2 and 3 stages, and checks each variant's dK, dV
(bit-identical expected) and dQ (float32 atomics: summation order differs) against the committed
kernel. ``--ncu NAME CFG``: run one backward (256K, 1 head) twice, for Nsight Compute to profile the
second. Writes $OUT/v8_bwd_probe.json.

Each round ran against the kernel as committed then (variants are string replacements of that source):
round 1 (default) at a02406a, ``--small-tiles`` at 4ffe851, ``--round3`` at 45d3b94, ``--gluon`` (the Gluon
backward, gluon_bwd.py, against the Triton one) from then on.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from moba_cli.ops.moba import triton_moba as tm
from scripts.fwd_breakdown import med
from scripts.gate_fwd_probe import emit, inputs, with_env, write_records
from scripts.v7_probe import SRC, variant, variants

TPF_OLD = """    d = tl.arange(0, D)
    for m0 in range(m_start, cnt, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        rvalid = rm < cnt
        t = tl.load(PAIR_T + base + rm, mask=rvalid, other=0)
        t64 = t.to(tl.int64)"""
TPF_NEW = """    d = tl.arange(0, D)
    rm_n = m_start + tl.arange(0, BLOCK_M)
    t_n = tl.load(PAIR_T + base + rm_n, mask=rm_n < cnt, other=0)
    for m0 in range(m_start, cnt, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        rvalid = rm < cnt
        t = t_n
        rm_n = rm + BLOCK_M
        t_n = tl.load(PAIR_T + base + rm_n, mask=rm_n < cnt, other=0)
        t64 = t.to(tl.int64)"""
# dQ as (K^T dS^T)^T: a [D, BLOCK_M] product whose M is the head dim, so query tiles of 32 rows still
# make Hopper MMAs (M = 64 per warp group); dQ = dS K with 32 query rows falls back to mma.sync.
DQT_OLD = """            dq = tl.dot(tl.trans(dst), kb, input_precision=PREC) * sm_scale
            tl.atomic_add(DQ + t64[:, None] * stride_dqt + h * stride_dqh + d[None, :], dq, mask=rvalid[:, None],
                          sem="relaxed")"""
DQT_NEW = """            dqt = tl.dot(tl.trans(kb), dst, input_precision=PREC) * sm_scale
            tl.atomic_add(DQ + t64[None, :] * stride_dqt + h * stride_dqh + d[:, None], dqt, mask=rvalid[None, :],
                          sem="relaxed")"""


# Round 3 (dQ^T product committed): the dO V^T product issued right after K Q^T, so dS is formed as soon as
# both are in and P's float32 copy dies earlier (fewer live registers at the dV/dP step); the softmax
# scale of dQ applied once to the float32 sum instead of every tile.
ORD_OLD = """        st = tl.dot(kb, tl.trans(q), input_precision=PREC) * qk_scale
        pt = tl.math.exp2(st - lse[None, :])
        if MASK:
            pt = tl.where(kmask[:, None] & rvalid[None, :] & (kn[:, None] <= t[None, :]), pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        dpt = tl.dot(vb, tl.trans(do), input_precision=PREC)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
"""
ORD_NEW = """        st = tl.dot(kb, tl.trans(q), input_precision=PREC)
        dpt = tl.dot(vb, tl.trans(do), input_precision=PREC)
        pt = tl.math.exp2(st * qk_scale - lse[None, :])
        if MASK:
            pt = tl.where(kmask[:, None] & rvalid[None, :] & (kn[:, None] <= t[None, :]), pt, 0.0)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
"""
NOS = [("dqt = tl.dot(tl.trans(kb), dst, input_precision=PREC) * sm_scale",
        "dqt = tl.dot(tl.trans(kb), dst, input_precision=PREC)"),
       ("return dq_acc.to(q.dtype), dk, dv", "return (dq_acc * scale if fused else dq_acc).to(q.dtype), dk, dv")]


def setup(seq, h, hkv=None, chunk=4096, topk=12):
    q, k, v, layout = inputs(seq, h, hkv or h, chunk)
    torch.manual_seed(1)
    do = torch.randn_like(q)
    sel = tm.select_blocks(q, k, layout, topk)
    sched = tm.Schedule(sel, layout.num_blocks, tm._fwd_config(128, q.dtype, chunk)["BLOCK_M"])
    out, lse = tm._forward(q, k, v, layout, sched, 128**-0.5)
    # From v9 the dK/dV kernels walk per-block lists (BwdLists); the fused backward needs no dQ schedule.
    return q, k, v, do, out, lse, layout, tm.BwdLists(sel, layout.num_blocks)


def rel(a, b):
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt().clamp_min(1e-30)).item()


def variants_case(name, seq, h, mods, hkv=None, chunk=4096, topk=12):
    q, k, v, do, out, lse, layout, sched = setup(seq, h, hkv, chunk, topk)
    scale = 128**-0.5
    ref = tm._backward(q, k, v, out, do, lse, layout, sched, None, scale, True)
    for label, mod, cfg in mods:
        # The Triton variants set MOBA_BWD_GLUON=0: from 61534a9 on the Gluon kernel is the Hopper default,
        # and before this line said so, the sixth call's "triton" rows (v8-bwd-gluon-presets.json) ran it too.
        if cfg.startswith("gluon"):
            env = {"MOBA_BWD_CFG": None, "MOBA_BWD_GLUON": "1", "MOBA_GLUON_PIPE": "1" if cfg == "gluon-pipe" else "0"}
        else:
            env = {"MOBA_BWD_CFG": cfg, "MOBA_BWD_GLUON": "0"}
        try:
            def run(mod=mod):
                return mod._backward(q, k, v, out, do, lse, layout, sched, None, scale, True)

            got = with_env(env, run)
            emit({"what": "bwd", "case": name, "variant": label, "cfg": cfg,
                  "ms": with_env(env, lambda: med(run, n=10)),
                  "dk_equal": bool(torch.equal(got[1], ref[1])), "dv_equal": bool(torch.equal(got[2], ref[2])),
                  "dq_rel_rms": rel(got[0], ref[0])})
            del got
        except Exception as e:  # a probe: keep going
            emit({"what": "bwd", "case": name, "variant": label, "cfg": cfg, "error": repr(e)[:400]})
    del ref
    torch.cuda.empty_cache()


def main():
    t0 = time.time()
    names = ("_probe_tpf", "_probe_dqt", "_probe_ord", "_probe_nos", "_probe_ordnos")
    try:
        if "--ncu" in sys.argv:
            i = sys.argv.index("--ncu")
            mod = tm  # "base": the Triton kernel as committed; "gluon": the Gluon one
            q, k, v, do, out, lse, layout, sched = setup(1 << 18, 1)
            env = {"MOBA_BWD_GLUON": "1"} if sys.argv[i + 1] == "gluon" else {"MOBA_BWD_CFG": sys.argv[i + 2]}
            for _ in range(2):
                with_env(env,
                         lambda: mod._backward(q, k, v, out, do, lse, layout, sched, None, 128**-0.5, True))
            torch.cuda.synchronize()
            return
        if "--pipe" in sys.argv:  # ninth call (6c7fa30 only): the Gluon products left running into the next tile
            mods = [("gluon", tm, "gluon"), ("gluon-pipe", tm, "gluon-pipe")]
            variants_case("paper-1m-h1", 1 << 20, 1, mods)
            variants_case("paper-128k-h8", 1 << 17, 8, mods)
            return write_records(t0, "v8_bwd_pipe.json")
        if "--gluon" in sys.argv:  # fourth call: the Gluon backward against the Triton one
            mods = [("triton", tm, "64,128,8,2"), ("gluon", tm, "gluon")]
            variants_case("paper-256k-h1", 1 << 18, 1, mods)
            variants_case("paper-1m-h1", 1 << 20, 1, mods)
            variants_case("paper-128k-h8", 1 << 17, 8, mods)
            if "--more" in sys.argv:  # sixth call: the other presets' shapes
                variants_case("flashmoba-512k-h16", 1 << 19, 16, mods, chunk=128, topk=8)
                variants_case("paper-128k-gqa32x8", 1 << 17, 32, mods, hkv=8)
            return write_records(t0, "v8_bwd_gluon.json")
        if "--round3" in sys.argv:  # third call: on top of the committed dQ^T product
            ord_ = variants("_probe_ord", [(ORD_OLD, ORD_NEW)])
            nos = variants("_probe_nos", NOS)
            ordnos = variants("_probe_ordnos", [(ORD_OLD, ORD_NEW)] + NOS)
            tpf = variant("_probe_tpf", TPF_OLD, TPF_NEW)
            mods = [("base", tm, "64,128,8,2"), ("base", tm, "64,128,8,3"), ("ord", ord_, "64,128,8,2"),
                    ("ord", ord_, "64,128,8,3"), ("nos", nos, "64,128,8,2"), ("ordnos", ordnos, "64,128,8,2"),
                    ("ordnos", ordnos, "64,128,8,3"), ("tpf", tpf, "64,128,8,2")]
            variants_case("paper-1m-h1", 1 << 20, 1, mods)
            variants_case("paper-128k-h8", 1 << 17, 8, mods)
            return write_records(t0, "v8_bwd_round3.json")
        tpf = variant("_probe_tpf", TPF_OLD, TPF_NEW)
        dqt = variant("_probe_dqt", DQT_OLD, DQT_NEW)
        if "--small-tiles" in sys.argv:  # second call: 4-warp programs small enough for two per SM
            mods = [("base", tm, "64,128,8,2"), ("base", tm, "32,64,4,2"), ("base", tm, "32,64,4,3"),
                    ("dqt", dqt, "32,64,4,2"), ("dqt", dqt, "32,64,4,3"), ("dqt", dqt, "64,128,8,2"),
                    ("dqt", dqt, "32,128,8,2")]
            variants_case("paper-1m-h1", 1 << 20, 1, mods)
            variants_case("paper-128k-h8", 1 << 17, 8, mods)
            return write_records(t0, "v8_bwd_small_tiles.json")
        mods = [("base", tm, "64,128,8,2"), ("base", tm, "64,128,8,3"),
                ("tpf", tpf, "64,128,8,2"), ("tpf", tpf, "64,128,8,3"), ("tpf", tpf, "64,128,8,4")]
        variants_case("paper-1m-h1", 1 << 20, 1, mods)
        variants_case("paper-128k-h8", 1 << 17, 8, mods)
    finally:
        for m in names:
            SRC.with_name(f"{m}.py").unlink(missing_ok=True)
    write_records(t0, "v8_bwd_probe.json")


if __name__ == "__main__":
    os.environ.setdefault("OUT", "scratch")
    main()
