"""GPU suite: the Triton kernels at realistic sizes against the float32 reference (marker ``gpu``).

Tolerance rule (flash-attention's): the kernel's error against a float32 reference may be at most twice
the error PyTorch's own bf16 attention (SDPA) shows against float32 on the same inputs, plus 1e-4.

The reference attends exactly the blocks the kernel chose (``block_idx`` override), so a gate decision
flipped by float32 rounding on a near-tie cannot make the outputs disagree; the gate itself is checked
separately: every disagreement with the reference's choice must be a near-tie.

Run: ``python -m pytest -m gpu tests/test_gpu_suite.py``; writes a JSON summary to
``$MOBA_GPU_SUITE_OUT`` (default ``results/gpu-suite/``).
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from moba_cli.ops.moba import naive, triton_moba
from moba_cli.ops.moba.layout import make_layout

pytestmark = pytest.mark.gpu

RECORDS: list[dict] = []


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


@pytest.fixture(scope="module", autouse=True)
def write_summary():
    yield
    if not RECORDS:
        return
    from moba_cli.results import make_result, write_result

    result = make_result(
        "gpu-suite",
        {"rule": "kernel rel-RMS error <= 2 x SDPA-bf16 rel-RMS error vs float32 + 1e-4"},
        RECORDS,
        {"cases": len(RECORDS), "passed": sum(r["passed"] for r in RECORDS)},
    )
    path = write_result(result, os.environ.get("MOBA_GPU_SUITE_OUT"), "results/gpu-suite")
    print(f"\nGPU suite summary written to {path}")


def sdpa_bf16_error(q, k, v, grads: bool):
    """PyTorch's own bf16 error (dense causal SDPA) against float32 on the same inputs."""
    if q.shape[1] != k.shape[1]:
        # The baseline only: expand K/V so float32 SDPA can use a memory-efficient kernel (its GQA path
        # falls back to the O(S^2) math kernel).
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    qb, kb, vb = (x.transpose(0, 1)[None].detach().requires_grad_(grads) for x in (q, k, v))
    qf, kf, vf = (x.float().detach().requires_grad_(grads) for x in (qb, kb, vb))
    f = torch.nn.functional.scaled_dot_product_attention
    ob = f(qb, kb, vb, is_causal=True)
    of = f(qf, kf, vf, is_causal=True)
    errs = {"out": rel_rms(ob, of)}
    if grads:
        do = torch.randn_like(of)
        ob.backward(do.bfloat16())
        of.backward(do)
        for n, a, b in (("dq", qb, qf), ("dk", kb, kf), ("dv", vb, vf)):
            errs[n] = rel_rms(a.grad, b.grad)
    return errs


CASES = [
    # seq, hq, hkv, chunk, topk, grads
    (8192, 8, 8, 512, 4, True),
    (16384, 16, 4, 1024, 6, True),
    (32768, 16, 16, 2048, 5, False),
    (65536, 32, 8, 4096, 12, False),
    (131072, 8, 2, 4096, 8, False),
    (131072, 8, 8, 8192, 64, False),  # top-k covers every block: full attention
]


@pytest.mark.parametrize(("seq", "hq", "hkv", "chunk", "topk", "grads"), CASES)
def test_kernel_matches_reference(seq, hq, hkv, chunk, topk, grads, monkeypatch):
    monkeypatch.setattr(triton_moba, "DENSE_WHEN_FULL", False)  # check the sparse kernels on every case
    torch.manual_seed(seq + hq)
    dev = torch.device("cuda")
    q = torch.randn(seq, hq, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(seq, hkv, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn(seq, hkv, 128, device=dev, dtype=torch.bfloat16)
    cu = torch.tensor([0, seq], dtype=torch.int32, device=dev)
    layout = make_layout(cu, chunk)
    t0 = time.perf_counter()

    sel = triton_moba.select_blocks(q, k, layout, topk)
    sel_ref = naive.select_blocks(q, k, layout, topk)
    mismatch = (sel.sort(-1).values != sel_ref.sort(-1).values).any(-1)
    n_mismatch = int(mismatch.sum())
    max_gap = 0.0
    if n_mismatch:
        # Each disagreement must be a near-tie: the kernel's weakest pick scores within rounding of the
        # reference's weakest pick.
        t_idx, h_idx = mismatch.nonzero(as_tuple=True)
        all_scores = naive.gate_scores(q, k, layout, 0)
        for t, h in list(zip(t_idx.tolist(), h_idx.tolist(), strict=True))[:200]:
            scores = all_scores[t, h]
            pick = scores[sel[t, h, 1:][sel[t, h, 1:] >= 0].long()]
            pick_ref = scores[sel_ref[t, h, 1:][sel_ref[t, h, 1:] >= 0].long()]
            scale = scores[torch.isfinite(scores)].abs().max().item()
            max_gap = max(max_gap, (pick_ref.min() - pick.min()).abs().item() / scale)
        del all_scores

    qk = [x.detach().requires_grad_(grads) for x in (q, k, v)]
    out = triton_moba.moba_attention_triton(*qk, layout, topk)
    ref_in = [x.float().detach().requires_grad_(grads) for x in (q, k, v)]
    ref, _ = naive.moba_attention_naive(*ref_in, layout, topk, block_idx=sel)
    errs = {"out": rel_rms(out, ref)}
    if grads:
        do = torch.randn_like(ref)
        out.backward(do.bfloat16())
        ref.backward(do)
        for n, a, b in (("dq", qk[0], ref_in[0]), ("dk", qk[1], ref_in[1]), ("dv", qk[2], ref_in[2])):
            errs[n] = rel_rms(a.grad, b.grad)
    base = sdpa_bf16_error(q, k, v, grads)
    ok = all(errs[n] <= 2 * base[n] + 1e-4 for n in errs) and max_gap < 1e-4
    ok = ok and not out.isnan().any().item()
    RECORDS.append(
        {
            "seq": seq, "heads": hq, "kv_heads": hkv, "head_dim": 128, "chunk": chunk, "topk": topk,
            "dtype": "bfloat16", "grads": grads, "errors": errs, "sdpa_bf16_errors": base,
            "gate_mismatches": n_mismatch, "gate_pairs": seq * hq, "gate_max_rel_gap": max_gap,
            "seconds": round(time.perf_counter() - t0, 2), "passed": bool(ok),
        }
    )
    for n in errs:
        assert errs[n] <= 2 * base[n] + 1e-4, (n, errs[n], base[n])
    assert max_gap < 1e-4
