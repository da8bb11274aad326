"""Helpers shared by the op tests: relative errors, seeded inputs, the reference check, poisoned options."""

from __future__ import annotations

import torch

from moba_cli.ops.moba import KernelOptions, naive

# Every kernel-written buffer filled with NaN / -7 first, so an element a kernel forgets shows up.
POISON = KernelOptions(poison_outputs=True)


def poisoned(**changes) -> KernelOptions:
    """:data:`POISON` with ``changes`` (other KernelOptions fields) applied."""
    return POISON.replace(**changes)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """``rms(a - b) / rms(b)`` in float64 (NaN if either holds NaN)."""
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def make_inputs(lens, hq, hkv, d, device, dtype=torch.float32, seed=0):
    """Packed q ``[T, hq, d]``, k/v ``[T, hkv, d]`` from a fixed seed, and int32 ``cu_seqlens`` of ``lens``."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q, k, v = (torch.randn(t, h, d, generator=g).to(device, dtype) for h in (hq, hkv, hkv))
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    return q, k, v, cu


def assert_matches_naive(out, leaves, inputs, layout, topk, tol=1e-4):
    """``out``, computed by the op from ``leaves`` (q, k, v requiring grad), against the float32 reference
    on copies of ``inputs``: the output and dq/dk/dv, none of them NaN."""
    ref_in = [x.clone().requires_grad_() for x in inputs]
    ref, _ = naive.moba_attention_naive(*ref_in, layout, topk)
    assert not out.isnan().any()
    assert rel_rms(out, ref) < tol
    do = torch.randn_like(ref)
    out.backward(do)
    ref.backward(do)
    for name, a, b in zip(("dq", "dk", "dv"), leaves, ref_in, strict=True):
        assert not a.grad.isnan().any(), name
        assert rel_rms(a.grad, b.grad) < tol, name
