"""Kernel-development probe for issue 4, kernel v6 (not the user benchmark; that is `moba bench`): the
grouped gate with its kept scores in scratch memory (persistent programs) against the sort gate, and the
backward with dQ fused into the dK/dV kernel (atomics) against the separate dQ pass, at the paper and
flashmoba presets. Writes $OUT/gate_bwd_probe.json (``--bwd-only``: the backward alone, fewer tile
configs, $OUT/bwd_probe.json; ``--bwd-sweep``: fused backward tile configs, $OUT/bwd_sweep.json) and
prints one JSON line per measurement.
"""

from __future__ import annotations

import sys
import time

import torch

from moba_cli.ops.moba import triton_moba as tm
from scripts.gate_fwd_probe import bench, emit, gate_cases, inputs, with_env, write_records


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def bwd_alone(name, q, k, v, layout, topk, cfgs, do, unfused=True):
    """Backward alone (fixed forward outputs): the unfused default (first, the reference for the
    differences), the fused default, then fused configs."""
    chunk = layout.chunk_size
    scale = 128**-0.5
    sel = tm.select_blocks(q, k, layout, topk)
    sched = tm.Schedule(sel, layout.num_blocks, tm._bwd_config(128, q.dtype, False)["BLOCK_M"])
    lists = tm.BwdLists(sel, layout.num_blocks)
    out, lse = tm._forward(q, k, v, layout, tm.Schedule(sel, layout.num_blocks, tm._fwd_config(128, q.dtype, chunk)[
        "BLOCK_M"]), scale)
    ref = None
    for fused, cfg in ([("0", "")] if unfused else []) + [("1", "")] + [("1", c) for c in cfgs]:
        env = {"MOBA_BWD_FUSED": fused, "MOBA_BWD_CFG": cfg or None}
        try:
            def run():
                return tm._backward(q, k, v, out, do, lse, layout, lists, sched, scale, tm.bwd_fused())

            grads = with_env(env, run)
            rec = {"what": "bwd", "case": name, "fused": fused, "cfg": cfg}
            if ref is None:
                ref = grads
            else:
                for n, a, b in zip(("dq", "dk", "dv"), grads, ref, strict=True):
                    rec[f"rel_rms_{n}"] = rel_rms(a, b)
            rec["ms"] = with_env(env, lambda: bench(run, rep=20))
            emit(rec)
        except Exception as e:  # a probe: keep going
            emit({"what": "bwd", "case": name, "fused": fused, "cfg": cfg, "error": repr(e)[:500]})


def bwd_cases(name, seq, hq, hkv, chunk, topk, cfgs):
    """The backward alone, then fwd and fwd+bwd end to end (defaults; dQ fused and not)."""
    q, k, v, layout = inputs(seq, hq, hkv, chunk)
    do = torch.randn_like(q)
    bwd_alone(name, q, k, v, layout, topk, cfgs, do)
    torch.cuda.empty_cache()
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    rec = {"what": "moba_e2e", "case": name, "fwd_ms": bench(lambda: tm.moba_attention_triton(q, k, v, layout, topk))}
    for fused in ("0", "1"):
        def fb():
            tm.moba_attention_triton(qg, kg, vg, layout, topk).backward(do)

        rec[f"fwdbwd_ms_fused{fused}"] = with_env({"MOBA_BWD_FUSED": fused}, lambda fb=fb: bench(fb, rep=15))
    emit(rec)


def main():
    t0 = time.time()
    if "--bwd-sweep" in sys.argv:  # fused backward tile configs, backward alone
        cfgs = ["64,64,8,2", "32,128,8,2", "64,128,8,3", "64,64,8,3"]
        for c in [("paper-1m", 1048576, 1, 1, 4096, 12), ("paper-128k-h8", 131072, 8, 8, 4096, 12)]:
            q, k, v, layout = inputs(*c[1:5])
            bwd_alone(c[0], q, k, v, layout, c[5], cfgs, torch.randn_like(q), unfused=False)
            del q, k, v
            torch.cuda.empty_cache()
        return write_records(t0, "bwd_sweep.json")
    if "--bwd-only" in sys.argv:  # second call: the gate was measured by the first
        for c in [
            ("paper-1m", 1048576, 1, 1, 4096, 12, ["64,128,8,1"]),
            ("flashmoba-512k", 524288, 16, 16, 128, 8, ["64,128,8,2"]),
        ]:
            bwd_cases(*c)
            torch.cuda.empty_cache()
        return write_records(t0, "bwd_probe.json")
    gcfg = ["64,16,4,3", "64,16,4,2", "128,16,8,3", "64,32,4,3", "32,16,4,3", "64,16,4,3,2"]
    for c in [
        ("flashmoba-512k", 524288, 16, 16, 128, 8, gcfg),
        ("c512-k8-1m", 1048576, 1, 1, 512, 8, ["64,16,4,3"]),
        ("c4096-k8-1m", 1048576, 1, 1, 4096, 8, ["64,16,4,3"]),
        ("paper-1m", 1048576, 1, 1, 4096, 12, ["64,16,4,3", "32,16,4,3"]),
        ("c128-k16-128k-h8", 131072, 8, 8, 128, 16, ["32,16,4,3", "64,16,4,3"]),
    ]:
        gate_cases(*c)
        torch.cuda.empty_cache()
    bcfg = ["64,64,4,2", "64,128,8,2", "64,128,8,1"]
    for c in [
        ("paper-1m", 1048576, 1, 1, 4096, 12, bcfg),
        ("flashmoba-512k", 524288, 16, 16, 128, 8, bcfg),
        ("paper-128k-h8", 131072, 8, 8, 4096, 12, bcfg),
    ]:
        bwd_cases(*c)
        torch.cuda.empty_cache()
    write_records(t0, "gate_bwd_probe.json")


if __name__ == "__main__":
    main()
