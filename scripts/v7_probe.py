"""Kernel-development probe for issue 4, kernel v7 (not the user benchmark; that is `moba bench`).

Paper preset (chunk 4096, top-k 12, bf16, D=128) at 1M tokens, 1 head, and 128K tokens, 8 heads:

* forward stages, each alone (median of CUDA-event timings): cached layout, gate, schedule (16-bit sort
  keys, and 32-bit for comparison), the attention launches (the own-block slot now writes the output),
  the Triton function and the public call;
* the backward alone: the default (dQ added with float32 atomics in the dK/dV kernel), the same kernel
  with plain stores in place of the atomics (wrong dQ, timing only: what the atomics cost), and the dK/dV
  kernel without dQ (4 products instead of 5).

Variants are copies of ``triton_moba`` with one line changed, written next to it and imported as
modules (Triton needs the source file). Writes $OUT/v7_probe.json (``--stages-h8``: the forward stages at
1M with 8 heads only, $OUT/v7_stages_h8.json) and prints one JSON line a record.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

from moba_cli import moba_attention
from moba_cli.ops.moba import triton_moba as tm
from moba_cli.ops.moba.layout import cached_layout
from scripts.fwd_breakdown import med
from scripts.gate_fwd_probe import emit, inputs, with_env, write_records

SRC = Path(tm.__file__)


def variants(name: str, pairs: list[tuple[str, str]]):
    """``triton_moba`` with each ``(old, new)`` replacement made (each ``old`` must occur), as module
    ``moba_cli.ops.moba.<name>``."""
    text = SRC.read_text()
    for old, new in pairs:
        if old not in text:
            raise SystemExit(f"variant {name}: {old!r} not found")
        text = text.replace(old, new)
    path = SRC.with_name(f"{name}.py")
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"moba_cli.ops.moba.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def variant(name: str, old: str, new: str):
    """``triton_moba`` with ``old`` replaced by ``new`` (see ``variants``)."""
    return variants(name, [(old, new)])


def forward_stages(name, seq, h, chunk, topk, tm32):
    q, k, v, _ = inputs(seq, h, h, chunk)
    layout = cached_layout([0, seq], chunk, q.device)
    sel = tm.select_blocks(q, k, layout, topk)
    bm = tm._fwd_config(128, q.dtype, chunk)["BLOCK_M"]
    sched = tm.Schedule(sel, layout.num_blocks, bm)
    emit({
        "what": "fwd_stages", "case": name,
        "layout_cached_ms": med(lambda: cached_layout([0, seq], chunk, q.device)),
        "gate_ms": med(lambda: tm.select_blocks(q, k, layout, topk)),
        "schedule_ms": med(lambda: tm.Schedule(sel, layout.num_blocks, bm)),
        "schedule_key32_ms": med(lambda: tm32.Schedule(sel, layout.num_blocks, bm)),
        "attention_ms": med(lambda: tm._forward(q, k, v, layout, sched, 128**-0.5)),
        "triton_fn_ms": med(lambda: tm.moba_attention_triton(q, k, v, layout, topk)),
        "public_call_ms": med(lambda: moba_attention(q[None], k[None], v[None], chunk_size=chunk, topk=topk)),
    })


def backward_variants(name, seq, h, chunk, topk, plain, nodq):
    q, k, v, layout = inputs(seq, h, h, chunk)
    do = torch.randn_like(q)
    scale = 128**-0.5
    sel = tm.select_blocks(q, k, layout, topk)
    sched = tm.Schedule(sel, layout.num_blocks, tm._fwd_config(128, q.dtype, chunk)["BLOCK_M"])
    out, lse = tm._forward(q, k, v, layout, sched, scale)
    rec = {"what": "bwd_variants", "case": name}
    # (v9 signature: per-block lists for dK/dV; the v7 variant modules predate it)
    lists = tm.BwdLists(sel, layout.num_blocks)
    for label, mod in (("fused_atomics", tm), ("fused_plain_stores", plain), ("dkdv_only", nodq)):
        rec[f"{label}_ms"] = med(lambda mod=mod: mod._backward(q, k, v, out, do, lse, layout, lists, None, scale, True))
    emit(rec)


def attn_ab(name, seq, h, other, label):
    """The attention launches as committed (``label`` on) against the variant module ``other`` (off)."""
    q, k, v, layout = inputs(seq, h, h, 4096)
    sel = tm.select_blocks(q, k, layout, 12)
    sched = tm.Schedule(sel, layout.num_blocks, tm._fwd_config(128, q.dtype, 4096)["BLOCK_M"])
    o_on, lse_on = tm._forward(q, k, v, layout, sched, 128**-0.5)
    o_off, lse_off = other._forward(q, k, v, layout, sched, 128**-0.5)
    emit({"what": f"attn_{label}", "case": name,
          f"{label}_on_ms": med(lambda: tm._forward(q, k, v, layout, sched, 128**-0.5)),
          f"{label}_off_ms": med(lambda: other._forward(q, k, v, layout, sched, 128**-0.5)),
          "out_max_abs_diff": (o_on.float() - o_off.float()).abs().max().item(),
          "lse_max_abs_diff": (lse_on - lse_off).abs().max().item()})


def lazy_and_gate(eager):
    """Attention launches with lazy rescaling (default) and without, at paper 1M (1 head) and 128K (8
    heads); then the sort gate's launch configs at paper 1M with 8 heads."""
    for case in (("paper-1m-h1", 1 << 20, 1), ("paper-128k-h8", 1 << 17, 8)):
        attn_ab(*case, eager, "lazy")
        torch.cuda.empty_cache()
    q, k, _, layout = inputs(1 << 20, 8, 8, 4096)
    ref = tm.select_blocks(q, k, layout, 12)
    for cfg in ("", "128,16,4", "128,16,8", "32,16,4", "64,32,4", "128,32,8", "64,16,8", "256,16,8"):
        def run():
            return tm.select_blocks(q, k, layout, 12)

        try:
            same = bool(torch.equal(with_env({"MOBA_GATE_CFG": cfg or None}, run), ref))
            emit({"what": "sort_gate_cfg", "case": "paper-1m-h8", "cfg": cfg, "same_selection": same,
                  "ms": with_env({"MOBA_GATE_CFG": cfg or None}, lambda: med(run))})
        except Exception as e:  # a probe: keep going
            emit({"what": "sort_gate_cfg", "case": "paper-1m-h8", "cfg": cfg, "error": repr(e)[:300]})


def main():
    t0 = time.time()
    tm32 = variant("_probe_key32", "if ngroups < 2**15 - 1:", "if False:")
    plain = variant("_probe_plain", "tl.atomic_add(DQ + t64[:, None] * stride_dqt + h * stride_dqh + d[None, :], dq, "
                    "mask=rvalid[:, None],\n                          sem=\"relaxed\")",
                    "tl.store(DQ + t64[:, None] * stride_dqt + h * stride_dqh + d[None, :], dq, mask=rvalid[:, None])")
    nodq = variant("_probe_nodq", "PREC=_prec(q.dtype), FUSED_DQ=fused,", "PREC=_prec(q.dtype), FUSED_DQ=False,")
    try:
        if "--prefetch" in sys.argv:  # fourth call: L2 prefetch of the merged partial results on/off
            off = variant("_probe_noprefetch", "FWD_PREFETCH = True", "FWD_PREFETCH = False")
            for case in (("paper-1m-h1", 1 << 20, 1), ("paper-128k-h8", 1 << 17, 8)):
                attn_ab(*case, off, "prefetch")
                torch.cuda.empty_cache()
            return write_records(t0, "v7_prefetch.json")
        if "--lazy-gate" in sys.argv:  # third call: lazy rescaling on/off; sort-gate launch configs
            eager = variant("_probe_eager", "FWD_LAZY = True", "FWD_LAZY = False")
            lazy_and_gate(eager)
            return write_records(t0, "v7_lazy_gate.json")
        if "--stages-h8" in sys.argv:  # second call: the forward stages at 1M with 8 heads
            forward_stages("paper-1m-h8", 1 << 20, 8, 4096, 12, tm32)
            return write_records(t0, "v7_stages_h8.json")
        for case in (("paper-1m-h1", 1 << 20, 1, 4096, 12), ("paper-128k-h8", 1 << 17, 8, 4096, 12)):
            forward_stages(*case, tm32)
            torch.cuda.empty_cache()
            backward_variants(*case, plain, nodq)
            torch.cuda.empty_cache()
    finally:
        for m in ("_probe_key32", "_probe_plain", "_probe_nodq", "_probe_eager", "_probe_noprefetch"):
            SRC.with_name(f"{m}.py").unlink(missing_ok=True)
    write_records(t0, "v7_probe.json")


if __name__ == "__main__":
    os.environ.setdefault("OUT", "scratch")
    main()
