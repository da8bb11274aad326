"""The inference forward's memory savers (ops/moba/triton_moba.py): partial results kept in the output's
own memory (float16 for 16-bit outputs, scaled per KV head) and the gate/schedule built piece by piece.

Each piece split is forced at tiny sizes and checked against the float32 reference and against the
one-piece forward, with every kernel-written buffer poisoned first.
"""

from __future__ import annotations

import pytest
import torch
from test_triton_moba import make_inputs, rel_rms

from moba_cli import moba_attention
from moba_cli.ops.moba import dense_prefix, naive, triton_moba
from moba_cli.ops.moba.layout import make_layout


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(triton_moba, "POISON_OUTPUTS", True)


def test_piece_sizes_follow_the_budget():
    fp = triton_moba.forward_pieces
    out_bytes = 2**20 * 1 * 128 * 2  # 1M tokens x 1 head x 128 dims, bf16
    heads, rows = fp(2**20, 1, 1, 12, 2, out_bytes, budget=0.12)
    assert heads == 1 and triton_moba.MIN_PIECE_ROWS <= rows < 2**20
    assert rows * (12 * 2 + triton_moba.SLOT_SCHEDULE_BYTES) <= 0.12 * out_bytes
    # GQA 32 q / 8 kv heads at 128K: whole KV groups (4 q heads) first, all rows
    heads, rows = fp(2**17, 32, 8, 12, 2, 2**17 * 32 * 128 * 2, budget=0.12)
    assert heads % 4 == 0 and 32 % heads == 0 and heads < 32 and rows == 2**17
    assert fp(2**20, 8, 8, 12, 2, out_bytes, budget=0) == (8, 2**20)
    assert fp(100, 4, 2, 3, 2, 10**9, budget=0.1) == (4, 100)  # fits: one piece
    assert triton_moba.index_dtype(32767) == torch.int16 and triton_moba.index_dtype(32768) == torch.int32


@pytest.mark.parametrize(
    ("lens", "hq", "hkv", "chunk", "topk", "min_rows"),
    [
        ([77], 4, 4, 16, 3, 17),  # MHA: head pieces, then rows that do not end on a block
        ([50, 13, 64], 4, 2, 16, 2, 20),  # GQA, varlen: pieces cross sequence starts
        ([45], 2, 1, 8, 4, 7),  # MQA: rows only
        ([40], 2, 2, 16, 1, 9),  # own block only (one slot)
    ],
)
def test_pieces_match_one_piece_and_reference(lens, hq, hkv, chunk, topk, min_rows, device, monkeypatch):
    q, k, v, cu = make_inputs(lens, hq, hkv, 32, device, seed=len(lens) + hq)
    layout = make_layout(cu, chunk)
    ref, _ = naive.moba_attention_naive(q, k, v, layout, topk)
    seen = []

    class Spy(triton_moba._SlotLauncher):  # one launcher per piece
        def __init__(self, *args):
            seen.append(args[0].shape[1])
            super().__init__(*args)

    monkeypatch.setattr(triton_moba, "_SlotLauncher", Spy)
    monkeypatch.setattr(triton_moba, "FWD_PIECE_BUDGET", 0.0)
    with torch.no_grad():
        whole = moba_attention(q, k, v, chunk_size=chunk, topk=topk, cu_seqlens=cu, backend="triton")
    assert len(seen) == 1
    seen.clear()
    monkeypatch.setattr(triton_moba, "FWD_PIECE_BUDGET", 1e-9)
    monkeypatch.setattr(triton_moba, "MIN_PIECE_ROWS", min_rows)
    with torch.no_grad():
        out = moba_attention(q, k, v, chunk_size=chunk, topk=topk, cu_seqlens=cu, backend="triton")
    assert len(seen) > 1, "the forward should have run in pieces"
    assert not out.isnan().any()
    assert rel_rms(out, ref) < 1e-5
    assert rel_rms(out, whole) < 1e-6


@pytest.mark.parametrize("magnitude", [1e-4, 1.0, 1e4])
def test_float16_partials_keep_precision(magnitude, device):
    """Partials stored as float16 in the output: values near float16's range or its subnormals stay as
    precise as the float16 output itself (the per-KV-head power-of-two scale)."""
    lens, hq, hkv, chunk, topk = [96], 2, 1, 8, 6  # 5 merges per query
    q, k, v, cu = make_inputs(lens, hq, hkv, 32, device, seed=3)
    v = v * magnitude
    q16, k16, v16 = (x.half() for x in (q, k, v))
    layout = make_layout(cu, chunk)
    ref, _ = naive.moba_attention_naive(q16.float(), k16.float(), v16.float(), layout, topk)
    rounding = rel_rms(ref.half().float(), ref)  # the output's own float16 rounding
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out = moba_attention(q16, k16, v16, chunk_size=chunk, topk=topk, cu_seqlens=cu, backend="triton")
        assert out.dtype == torch.float16 and not out.isnan().any() and not out.isinf().any()
        assert rel_rms(out.float(), ref) < 4 * rounding + 1e-4


def test_value_scales_are_powers_of_two():
    v = torch.zeros(5, 3, 4, dtype=torch.bfloat16)
    v[:, 0] = 1e6
    v[:, 1] = 3e-5
    s = triton_moba.value_scales(v)
    assert s.dtype == torch.float32 and s.shape == (3,)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    assert (v[:, :2].abs().amax(dim=(0, 2)).float() * s[:2]).le(2**14).all()
    assert (v[:, :2].abs().amax(dim=(0, 2)).float() * s[:2]).gt(2**13).all()
    assert s[2] == 2**14  # all zero: nothing to scale
    assert torch.equal(triton_moba.value_scales(v.float()), torch.ones(3))


def test_pieces_with_dense_prefix(device, monkeypatch):
    monkeypatch.setattr(dense_prefix, "DENSE_PREFIX", True)
    monkeypatch.setattr(dense_prefix, "MIN_ROWS", 0)
    monkeypatch.setattr(dense_prefix, "USE_REFERENCE", True)
    monkeypatch.setattr(triton_moba, "FWD_PIECE_BUDGET", 1e-9)
    monkeypatch.setattr(triton_moba, "MIN_PIECE_ROWS", 11)
    batch, seq, hq, hkv, chunk, topk = 2, 64, 4, 2, 16, 2
    q, k, v, cu = make_inputs([seq] * batch, hq, hkv, 32, device, seed=9)
    layout = make_layout(cu, chunk)
    ref, _ = naive.moba_attention_naive(q, k, v, layout, topk)
    with torch.no_grad():
        out = moba_attention(*(x.view(batch, seq, *x.shape[1:]) for x in (q, k, v)), chunk_size=chunk, topk=topk,
                             backend="triton").view(q.shape)
    assert not out.isnan().any()
    assert rel_rms(out, ref) < 1e-5
