"""``torch.compile`` of code that calls ``moba_attention``: the op is a ``torch.library`` custom op
(``moba::attention_fwd`` / ``moba::attention_bwd``), so the attention stays in the graph (no graph break)
and the compiled forward and gradients match eager. CPU: the naive backend, and the Triton kernels under
the interpreter (float32)."""

from __future__ import annotations

import pytest
import torch
from utils import POISON, make_inputs, rel_rms

from moba_cli.ops.moba import moba_attention
from moba_cli.ops.moba.custom_op import op_slots


def assert_fwd_bwd_match(run, ref, tensors) -> None:
    """``run(*leaves)`` and ``ref(*leaves)`` on fresh leaf copies of ``tensors`` agree: output to 1e-5 and the
    leaves' gradients to 1e-4 relative RMS (``ref`` may return another view of the same values)."""
    leaves = [x.clone().requires_grad_() for x in tensors]
    ref_leaves = [x.clone().requires_grad_() for x in tensors]
    got, want = run(*leaves), ref(*ref_leaves)
    assert rel_rms(got, want.view(got.shape)) < 1e-5
    do = torch.randn_like(got)
    got.backward(do)
    want.backward(do.view(want.shape))
    for a, b in zip(leaves, ref_leaves, strict=True):
        assert rel_rms(a.grad, b.grad.view(a.shape)) < 1e-4

CASES = [("naive", None), ("triton", POISON)]


class TinyAttention(torch.nn.Module):
    """Projections around MoBA, as a converted model's layer has them."""

    def __init__(self, dim: int, hq: int, hkv: int, backend: str, options) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.hq, self.hkv, self.d = hq, hkv, dim // hq
        self.q = torch.nn.Parameter(torch.randn(dim, dim, generator=g) / dim**0.5)
        self.kv = torch.nn.Parameter(torch.randn(dim, 2 * hkv * self.d, generator=g) / dim**0.5)
        self.backend, self.options = backend, options

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = (x @ self.q).view(b, s, self.hq, self.d)
        k, v = (x @ self.kv).view(b, s, 2, self.hkv, self.d).unbind(2)
        o = moba_attention(q, k, v, chunk_size=8, topk=3, backend=self.backend, options=self.options)
        return torch.tanh(o.reshape(b, s, -1))


@pytest.mark.parametrize(("backend", "options"), CASES)
def test_compiled_module_matches_eager_without_graph_breaks(backend, options):
    torch._dynamo.reset()
    mod = TinyAttention(64, 2, 1, backend, options)
    x = torch.randn(2, 37, 64, generator=torch.Generator().manual_seed(1))
    explain = torch._dynamo.explain(mod)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1
    torch._dynamo.reset()  # explain's compiled frame must not serve the compiled call below
    want = mod(x)
    want.square().sum().backward()
    want_grads = [p.grad.clone() for p in mod.parameters()]
    mod.zero_grad()
    got = torch.compile(mod, backend="aot_eager", fullgraph=True)(x)
    assert rel_rms(got, want) < 1e-5
    got.square().sum().backward()
    for p, g in zip(mod.parameters(), want_grads, strict=True):
        assert not p.grad.isnan().any()
        assert rel_rms(p.grad, g) < 1e-4


@pytest.mark.parametrize(("backend", "options"), CASES)
def test_compiled_varlen_call_matches_eager(backend, options):
    torch._dynamo.reset()
    q, k, v, cu = make_inputs([13, 30, 7], 2, 1, 32, "cpu", seed=4)

    def f(q, k, v):
        return moba_attention(q, k, v, chunk_size=8, topk=2, cu_seqlens=cu, max_seqlen=30, backend=backend,
                              options=options)

    assert_fwd_bwd_match(torch.compile(f, backend="aot_eager", fullgraph=True), f, (q, k, v))


@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_opcheck(backend):
    # torch.library's own checks: schema, fake (meta) implementation, autograd registration.
    q, k, v, cu = make_inputs([11, 6], 2, 1, 32, "cpu", seed=2)
    args = [x.requires_grad_() for x in (q, k, v)]
    key = POISON.key()
    torch.library.opcheck(torch.ops.moba.attention_fwd.default, (*args, cu, 4, 2, 32**-0.5, 11, backend, key))


def test_op_pads_the_selection_to_a_bound_known_from_shapes():
    # 11 tokens in blocks of 4: 3 blocks, so topk 5 keeps 3 slots; the fake implementation needs no cu_seqlens.
    assert op_slots(5, 11, 4) == 3 and op_slots(2, 11, 4) == 2 and op_slots(3, 0, 4) == 1
    q, k, v, cu = make_inputs([11, 3], 2, 1, 32, "cpu", seed=2)
    out, lse, idx = torch.ops.moba.attention_fwd(q, k, v, cu, 4, 5, 0.2, 11, "naive", POISON.key())
    assert idx.shape == (14, 2, 3) and bool((idx[11:, :, 1:] == -1).all())
    want = moba_attention(q, k, v, chunk_size=4, topk=5, cu_seqlens=cu, softmax_scale=0.2, backend="naive")
    assert torch.equal(out, want)


@pytest.mark.parametrize("path", ["dense_prefix", "long_blocks"])
def test_op_serves_the_cudnn_paths(path):
    # The cuDNN paths on CPU (float32 stand-in): the op keeps the dense prefix's log-sum-exp, so its
    # backward (all rows in the sparse kernels) matches the eager function's (prefix rows through cuDNN).
    from moba_cli.ops.moba import plan_call

    opts = POISON.replace(cudnn_reference=True, dense_prefix_min_rows=0,
                          cudnn_min_chunk=0 if path == "long_blocks" else 2**20, cudnn_pad_rows=8, cudnn_tile_rows=16)
    q, k, v, cu = make_inputs([40, 40], 2, 1, 32, "cpu", seed=7)
    assert plan_call(q, k, chunk_size=8, topk=2, cu_seqlens=cu, backend="triton", options=opts).path == path
    assert_fwd_bwd_match(
        lambda *x: torch.ops.moba.attention_fwd(*x, cu, 8, 2, 32**-0.5, 40, "triton", opts.key())[0],
        lambda *x: moba_attention(*x, chunk_size=8, topk=2, cu_seqlens=cu, backend="triton", options=opts),
        (q, k, v))


def test_options_travel_as_a_key():
    from moba_cli.ops.moba import KernelOptions
    from moba_cli.ops.moba.options import from_key

    for opts in (KernelOptions(), POISON.replace(gate_kind="sort", fwd_cfg=(16, 16, 4, 1), fwd_desc=False)):
        assert from_key(opts.key()) == opts


# ------------------------------------------------------------------ rows packing several sequences (position_ids)

LENS = [13, 24, 9, 28]  # two rows of 37: [13, 24] and [9, 28]


def _rows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[2, 37, H, D]`` whose rows pack two sequences each, their position_ids, and the packed
    ``cu_seqlens`` of those four sequences."""
    q, k, v, cu = make_inputs(LENS, 2, 1, 32, "cpu", seed=5)
    pos = torch.cat([torch.arange(n) for n in LENS]).view(2, 37) + 3  # offsets do not matter, the restarts do
    return *(x.view(2, 37, *x.shape[1:]) for x in (q, k, v)), pos, cu


@pytest.mark.parametrize(("backend", "options"), CASES)
def test_position_ids_split_rows_like_cu_seqlens(backend, options):
    q, k, v, pos, cu = _rows()
    got = moba_attention(q, k, v, chunk_size=8, topk=2, position_ids=pos, backend=backend, options=options)
    flat = [x.flatten(0, 1) for x in (q, k, v)]
    want = moba_attention(*flat, chunk_size=8, topk=2, cu_seqlens=cu, backend=backend, options=options)
    assert torch.equal(got, want.view(q.shape))
    rows = moba_attention(q, k, v, chunk_size=8, topk=2, backend=backend, options=options)
    one_row = moba_attention(q, k, v, chunk_size=8, topk=2, position_ids=torch.arange(37)[None], backend=backend,
                             options=options)
    assert torch.equal(one_row, rows) and not torch.equal(got, rows)


@pytest.mark.parametrize(("backend", "options"), CASES)
def test_compiled_packed_rows_match_eager_in_one_graph(backend, options):
    # The starts of packed rows reach the op as a fixed-shape tensor: fullgraph holds, no break.
    torch._dynamo.reset()
    q, k, v, pos, _ = _rows()

    def f(q, k, v, pos):
        return moba_attention(q, k, v, chunk_size=8, topk=2, position_ids=pos, backend=backend, options=options)

    explain = torch._dynamo.explain(f)(q, k, v, pos)
    assert explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()
    assert_fwd_bwd_match(lambda *x: torch.compile(f, backend="aot_eager", fullgraph=True)(*x, pos),
                         lambda *x: f(*x, pos), (q, k, v))


@pytest.mark.parametrize("backend", ["naive", "auto"])
def test_compiled_full_attention_with_position_ids(backend):
    from moba_cli.ops.moba import full_attention

    torch._dynamo.reset()
    q, k, v, pos, cu = _rows()

    def f(q, k, v, pos):
        return full_attention(q, k, v, position_ids=pos, backend=backend)

    def by_cu(*x):
        return full_attention(*(t.flatten(0, 1) for t in x), cu_seqlens=cu, backend=backend)

    assert torch.equal(f(q, k, v, pos), by_cu(q, k, v).view(q.shape))  # eager: the cu_seqlens call
    assert_fwd_bwd_match(lambda *x: torch.compile(f, backend="aot_eager", fullgraph=True)(*x, pos), by_cu, (q, k, v))


def test_opcheck_with_starts():
    from moba_cli.ops.moba.packing import sequence_starts

    q, k, v, pos, _ = _rows()
    starts = sequence_starts(pos, 2).flatten()
    rows = torch.tensor([0, 37, 74], dtype=torch.int32)
    args = [x.flatten(0, 1).requires_grad_() for x in (q, k, v)]
    torch.library.opcheck(torch.ops.moba.attention_fwd.default,
                          (*args, rows, 8, 2, 32**-0.5, 37, "naive", POISON.key(), starts))
    for backend in ("naive", "auto"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        torch.library.opcheck(torch.ops.moba.full_fwd.default, (*leaves, starts, None, backend))


def test_op_splits_cu_seqlens_at_starts():
    from moba_cli.errors import MobaError
    from moba_cli.ops.moba.packing import split_cu_seqlens

    starts = torch.zeros(10, dtype=torch.bool)
    starts[[0, 4, 7]] = True
    got = split_cu_seqlens(torch.tensor([0, 6, 6, 10], dtype=torch.int32), starts)
    assert got.tolist() == [0, 4, 6, 7, 10] and got.dtype == torch.int32  # union of both; empty ones drop out
    q, k, v, cu = make_inputs([10], 2, 1, 32, "cpu", seed=1)
    with pytest.raises(MobaError, match="starts must be bool"):
        torch.ops.moba.attention_fwd(q, k, v, cu, 4, 2, 0.2, 10, "naive", POISON.key(), starts[:9])
