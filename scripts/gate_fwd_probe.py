"""Kernel-development probe for issue 4 (not the user benchmark; that is `moba bench`): the grouped gate
against the sort gate, and the forward with and without TMA descriptors, at the paper and flashmoba
presets. Writes $OUT/gate_fwd_probe.json and prints one JSON line per measurement.

python scripts/gate_fwd_probe.py [--gates | --fwd-sweep]   (--gates: only the gate, at five shapes;
--fwd-sweep: forward tile configs at paper 1M)
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
RECS: list[dict] = []


def bench(fn, rep=100):
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def emit(rec: dict) -> None:
    RECS.append(rec)
    print(json.dumps(rec), flush=True)


def with_env(env: dict, fn):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v for k, v in env.items() if v is not None})
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
    try:
        return fn()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def inputs(seq, hq, hkv, chunk):
    torch.manual_seed(0)
    q = torch.randn(seq, hq, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(seq, hkv, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(seq, hkv, 128, device="cuda", dtype=torch.bfloat16)
    layout = make_layout(torch.tensor([0, seq], dtype=torch.int32, device="cuda"), chunk)
    return q, k, v, layout


def gate_cases(name, seq, hq, hkv, chunk, topk, cfgs):
    q, k, v, layout = inputs(seq, hq, hkv, chunk)
    ref = with_env({"MOBA_GATE_KIND": "sort"}, lambda: tm.select_blocks(q, k, layout, topk))
    ms = with_env({"MOBA_GATE_KIND": "sort"}, lambda: bench(lambda: tm.select_blocks(q, k, layout, topk)))
    emit({"what": "gate", "case": name, "kind": "sort", "cfg": None, "ms": ms})
    for cfg in cfgs:
        env = {"MOBA_GATE_KIND": "grouped", "MOBA_GATE_CFG": cfg}
        try:
            sel = with_env(env, lambda: tm.select_blocks(q, k, layout, topk))
            same = (sel.sort(-1).values == ref.sort(-1).values).all(-1).float().mean().item()
            ms = with_env(env, lambda: bench(lambda: tm.select_blocks(q, k, layout, topk)))
            emit({"what": "gate", "case": name, "kind": "grouped", "cfg": cfg, "ms": ms, "rows_same_as_sort": same})
        except Exception as e:  # a probe: keep going
            emit({"what": "gate", "case": name, "kind": "grouped", "cfg": cfg, "error": repr(e)[:500]})


def fwd_cases(name, seq, hq, hkv, chunk, topk, cfgs, bwd=False, descs=("0", "1")):
    q, k, v, layout = inputs(seq, hq, hkv, chunk)
    sel = tm.select_blocks(q, k, layout, topk)
    scale = 128**-0.5
    ref = None
    for cfg in cfgs:
        for desc in descs:
            env = {"MOBA_FWD_CFG": cfg or None, "MOBA_FWD_DESC": desc}
            try:
                bm = int(cfg.split(",")[0]) if cfg else tm._fwd_config(128, q.dtype, chunk)["BLOCK_M"]
                sched = tm.Schedule(sel, layout.num_blocks, bm)
                def run(sched=sched):
                    return tm._forward(q, k, v, layout, sched, scale)

                out, _ = with_env(env, run)
                if ref is None:
                    ref = out
                err = ((out.float() - ref.float()).abs().max()).item()
                ms = with_env(env, lambda run=run: bench(run))
                emit({"what": "attn_fwd", "case": name, "cfg": cfg, "desc": desc, "ms": ms, "max_diff_vs_first": err})
            except Exception as e:
                emit({"what": "attn_fwd", "case": name, "cfg": cfg, "desc": desc, "error": repr(e)[:500]})
    # End to end with the defaults (gate + schedule + attention), fwd and fwd+bwd.
    ms = bench(lambda: tm.moba_attention_triton(q, k, v, layout, topk))
    rec = {"what": "moba_fwd", "case": name, "ms": ms}
    if bwd:
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        do = torch.randn_like(q)

        def fb():
            tm.moba_attention_triton(qg, kg, vg, layout, topk).backward(do)

        rec["fwdbwd_ms"] = bench(fb, rep=50)
    emit(rec)


def main():
    t0 = time.time()
    torch.cuda.empty_cache()
    if "--fwd-sweep" in sys.argv:  # forward tile configs at paper 1M, TMA descriptors on
        fwd_cases("paper-1m", 1048576, 1, 1, 4096, 12, ["", "128,64,8,4", "128,128,8,3", "256,64,16,2"],
                  descs=("1",))
    elif "--gates" in sys.argv:
        # (name, seq, heads, kv heads, chunk, topk, grouped configs)
        for c in [
            ("flashmoba-512k", 524288, 16, 16, 128, 8, ["64,16,4", "128,16,8", "64,32,4"]),
            ("c512-k8-1m", 1048576, 1, 1, 512, 8, ["64,16,4"]),
            ("c4096-k8-1m", 1048576, 1, 1, 4096, 8, ["64,16,4"]),
            ("paper-1m", 1048576, 1, 1, 4096, 12, ["32,16,4"]),
            ("c128-k16-128k-h8", 131072, 8, 8, 128, 16, ["32,16,4"]),
        ]:
            gate_cases(*c)
            torch.cuda.empty_cache()
    else:
        gate_cfgs = ["64,16,4", "128,16,8", "64,16,8", "32,16,4", "64,32,4", "128,32,8"]
        gate_cases("flashmoba-512k", 524288, 16, 16, 128, 8, gate_cfgs)
        torch.cuda.empty_cache()
        gate_cases("paper-1m", 1048576, 1, 1, 4096, 12, ["64,16,4", "32,16,4"])
        fwd_cfgs = ["", "128,128,8,2", "128,64,4,3", "64,64,4,3"]
        torch.cuda.empty_cache()
        fwd_cases("paper-1m", 1048576, 1, 1, 4096, 12, fwd_cfgs, bwd=True)
        torch.cuda.empty_cache()
        fwd_cases("flashmoba-512k", 524288, 16, 16, 128, 8, ["", "128,64,8,3"], bwd=True)
    name = "gate_probe.json" if "--gates" in sys.argv else "gate_fwd_probe.json"
    write_records(t0, "fwd_sweep.json" if "--fwd-sweep" in sys.argv else name)


def write_records(t0: float, name: str) -> None:
    """$OUT/name: the records with the GPU, versions, commit and wall time."""
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, name), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
                   "git_commit": os.environ.get("MOBA_GIT_COMMIT"), "wall_s": round(time.time() - t0, 1),
                   "records": RECS}, f, indent=1)


if __name__ == "__main__":
    main()
