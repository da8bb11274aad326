"""Which Triton runs the Gluon backward (gluon_compat.py), and the fallback to the Triton backward where it cannot.

The Gluon kernel needs a Hopper GPU; here its launcher runs with the kernel swapped for a stand-in, and the
whole op runs in the Triton interpreter with the Gluon path forced on, so the fallback is exercised end to end.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from moba_cli import moba_attention
from moba_cli.ops.moba import KernelOptions, bwd, gluon_compat, naive
from moba_cli.ops.moba.layout import make_layout


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """Each test starts with no recorded failure, no warning given, the API check redone."""
    monkeypatch.setattr(gluon_compat, "_failure", None)
    monkeypatch.setattr(gluon_compat, "_warned", False)
    gluon_compat._api_check.cache_clear()
    yield
    gluon_compat._api_check.cache_clear()


def gluon_bwd_or_skip():
    if not gluon_compat.gluon_supported()[0]:
        pytest.skip(f"this Triton cannot build the Gluon kernel: {gluon_compat.gluon_supported()[1]}")
    from moba_cli.ops.moba import gluon_bwd

    return gluon_bwd


def test_supported_on_the_tested_releases():
    import triton

    version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    ok, why = gluon_compat.gluon_supported()
    if (3, 6) <= version <= (3, 8):
        assert ok and why == "", why
    # The shim found a real Gluon function for each moved name, not the stand-in.
    if ok:
        from triton.experimental.gluon import language as gl

        assert gluon_compat.cta_barrier is getattr(gl, "barrier", getattr(gl, "thread_barrier", None))


def test_missing_name_is_reported(monkeypatch):
    mods = gluon_compat._modules()
    gl = types.SimpleNamespace(**{n: getattr(mods["gl"], n) for n in dir(mods["gl"])
                                  if n not in ("barrier", "thread_barrier")})
    monkeypatch.setattr(gluon_compat, "_modules", lambda: {**mods, "gl": gl})
    ok, why = gluon_compat.gluon_supported()
    assert not ok
    assert "gl.barrier/thread_barrier" in why


def test_old_triton_and_no_gluon(monkeypatch):
    monkeypatch.setattr(gluon_compat, "_triton_version", lambda: (3, 5))
    assert gluon_compat.gluon_supported() == (False, "Triton 3.5 is older than 3.6")
    gluon_compat._api_check.cache_clear()
    monkeypatch.setattr(gluon_compat, "_triton_version", lambda: (3, 9))

    def no_gluon():
        raise ImportError("No module named 'triton.experimental.gluon'")

    monkeypatch.setattr(gluon_compat, "_modules", no_gluon)
    ok, why = gluon_compat.gluon_supported()
    assert not ok and "has no Gluon Hopper API" in why


def test_mark_unsupported_and_warn_once():
    gluon_compat.mark_unsupported("it does not compile")
    assert gluon_compat.gluon_supported() == (False, "it does not compile")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gluon_compat.warn_fallback("one")
        gluon_compat.warn_fallback("two")
    assert len(caught) == 1
    assert "Gluon" in str(caught[0].message) and "one" in str(caught[0].message)


def test_usable_warns_once_where_unsupported(monkeypatch):
    monkeypatch.setattr(gluon_compat, "_triton_version", lambda: (3, 5))
    with pytest.warns(RuntimeWarning, match="Triton 3.5 is older than 3.6.*using the Triton backward"):
        assert gluon_compat.gluon_usable() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gluon_compat.gluon_usable() is False


class StandIn:
    """In place of the Gluon kernel: ``warmup`` (compile only) fails or not; a launch is recorded."""

    def __init__(self, fails: bool) -> None:
        self.fails, self.warmups, self.launches = fails, 0, 0

    def warmup(self, *args, grid, **kwargs):
        self.warmups += 1
        if self.fails:
            # What Triton raises for a Gluon builtin that this release lacks or calls differently.
            from triton.compiler.errors import CompilationError

            raise CompilationError("at 3:4:\n    cta_barrier()\n", None, "AttributeError: no attribute 'x'")

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1

        return launch


def launch_args(d=128, chunk=200):
    t, hq, hkv = 300, 8, 2
    q = torch.zeros(t, hq, d, dtype=torch.bfloat16)
    kv = torch.zeros(t, hkv, d, dtype=torch.bfloat16)
    ints = torch.zeros(t, dtype=torch.int32)
    lists = types.SimpleNamespace(pair_t=ints, group_off=ints, group_cnt=ints)
    layout = types.SimpleNamespace(chunk_size=chunk, num_blocks=2, block_start=ints, block_end=ints)
    return (q, kv, kv, q, ints.float(), ints.float(), kv, kv, q.float(), lists, layout, 0.1, 1.4)


def test_launch_compiles_once_then_runs(monkeypatch):
    gluon_bwd = gluon_bwd_or_skip()
    kernel = StandIn(fails=False)
    monkeypatch.setattr(gluon_bwd, "bwd_dkdv_kernel", kernel)
    monkeypatch.setattr(gluon_bwd, "_COMPILED", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gluon_bwd.launch(*launch_args()) is True
        assert gluon_bwd.launch(*launch_args()) is True
    assert (kernel.warmups, kernel.launches) == (1, 2)
    assert gluon_bwd.launch(*launch_args(chunk=256)) is True  # EVEN: another setting, compiled once more
    assert kernel.warmups == 2


def test_launch_that_does_not_compile_falls_back(monkeypatch):
    gluon_bwd = gluon_bwd_or_skip()
    kernel = StandIn(fails=True)
    monkeypatch.setattr(gluon_bwd, "bwd_dkdv_kernel", kernel)
    monkeypatch.setattr(gluon_bwd, "_COMPILED", set())
    with pytest.warns(RuntimeWarning, match="Gluon.*CompilationError.*no attribute 'x'.*Triton backward"):
        assert gluon_bwd.launch(*launch_args()) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning a process
        assert gluon_bwd.launch(*launch_args()) is False
    assert (kernel.warmups, kernel.launches) == (1, 0)  # not tried again, never launched
    assert gluon_compat.gluon_supported()[0] is False


def test_op_falls_back_to_triton_backward(monkeypatch):
    # The Gluon path forced on (it needs a Hopper GPU), its kernel failing to compile: the op still gives
    # the reference's gradients, from the Triton backward, with one warning.
    gluon_bwd = gluon_bwd_or_skip()
    kernel = StandIn(fails=True)
    monkeypatch.setattr(gluon_bwd, "bwd_dkdv_kernel", kernel)
    monkeypatch.setattr(gluon_bwd, "_COMPILED", set())
    monkeypatch.setattr(bwd, "bwd_gluon", lambda q, opts: True)
    opts = KernelOptions(bwd_fused=True, poison_outputs=True)
    g = torch.Generator().manual_seed(0)
    lens, hq, hkv, d, chunk, topk = (37, 50), 2, 1, 32, 16, 2
    t = sum(lens)
    q, k, v = (torch.randn(t, h, d, generator=g) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, lens[0], t], dtype=torch.int32)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    do = torch.randn(t, hq, d, generator=g)
    with pytest.warns(RuntimeWarning, match="using the Triton backward"):
        moba_attention(*leaves, chunk_size=chunk, topk=topk, cu_seqlens=cu, backend="triton",
                       options=opts).backward(do)
    ref, _ = naive.moba_attention_naive(*ref_in, make_layout(cu, chunk), topk)
    ref.backward(do)
    assert kernel.warmups == 1 and kernel.launches == 0
    for name, a, b in zip(("dq", "dk", "dv"), leaves, ref_in, strict=True):
        assert not a.grad.isnan().any(), name
        err = ((a.grad - b.grad).pow(2).mean().sqrt() / b.grad.pow(2).mean().sqrt()).item()
        assert err < 1e-4, (name, err)
