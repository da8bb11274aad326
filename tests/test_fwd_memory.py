"""The inference forward's memory savers: partial results kept in the output's own memory (float16 for
16-bit outputs, scaled per KV head; ops/moba/fwd.py) and the gate and schedules built slot by slot and
piece by piece (ops/moba/fwd_pieces.py).

Each piece split is forced at tiny sizes and checked against the float32 reference and against the
one-piece forward, with every kernel-written buffer poisoned first.
"""

from __future__ import annotations

import pytest
import torch
from utils import make_inputs, poisoned, rel_rms

from moba_cli import moba_attention
from moba_cli.ops.moba import dense_prefix, fwd, fwd_pieces, naive, slot_schedule
from moba_cli.ops.moba.gate import index_dtype
from moba_cli.ops.moba.layout import make_layout


def test_piece_sizes_follow_the_budget():
    fp = fwd_pieces.forward_pieces
    counted, sorted_ = slot_schedule.schedule_bytes(256), slot_schedule.schedule_bytes(4096)
    assert counted <= 6 and sorted_ == 30  # 256 blocks: counting sort; 4096 (flashmoba preset): the sort
    out_bytes = 2**20 * 1 * 128 * 2  # 1M tokens x 1 head x 128 dims, bf16
    # The paper preset (12 int16 slots, 256 blocks) fits in one piece: its lists and one slot's
    # counting-sort schedule stay within 12% of the output, where the stable sort's schedule did not.
    assert fp(2**20, 1, 1, 12, 2, out_bytes, 0.12, 65536, counted) == (1, 2**20)
    heads, rows = fp(2**20, 1, 1, 12, 2, out_bytes, 0.12, 65536, sorted_)
    assert heads == 1 and 65536 <= rows < 2**20
    assert rows * (12 * 2 + sorted_) <= 0.12 * out_bytes
    heads, rows = fp(2**20, 1, 1, 12, 2, out_bytes, 0.05, 65536, counted)  # a tighter budget: row pieces
    assert heads == 1 and 65536 <= rows < 2**20
    assert rows * (12 * 2 + counted) <= 0.05 * out_bytes
    # GQA 32 q / 8 kv heads at 128K: whole KV groups (4 q heads) first, all rows
    gqa_out = 2**17 * 32 * 128 * 2
    heads, rows = fp(2**17, 32, 8, 12, 2, gqa_out, 0.05, 65536, counted)
    assert heads % 4 == 0 and 32 % heads == 0 and heads < 32 and rows == 2**17
    assert fp(2**17, 32, 8, 12, 2, gqa_out, 0.12, 65536, counted) == (32, 2**17)
    # flashmoba preset (512K x 16 heads, 8 slots, 4096 blocks: sorted): pieces of 8 heads, all rows
    assert fp(2**19, 16, 16, 8, 2, 2**19 * 16 * 128 * 2, 0.12, 65536, sorted_) == (8, 2**19)
    assert fp(2**20, 8, 8, 12, 2, out_bytes, 0, 65536, counted) == (8, 2**20)
    assert fp(100, 4, 2, 3, 2, 10**9, 0.1, 65536, sorted_) == (4, 100)  # fits: one piece
    assert index_dtype(32767) == torch.int16 and index_dtype(32768) == torch.int32


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

    class Spy(fwd_pieces.SlotLauncher):  # one launcher per piece
        def __init__(self, *args):
            seen.append(args[0].shape[1])
            super().__init__(*args)

    monkeypatch.setattr(fwd_pieces, "SlotLauncher", Spy)
    kw = dict(chunk_size=chunk, topk=topk, cu_seqlens=cu, backend="triton")
    with torch.no_grad():
        whole = moba_attention(q, k, v, **kw, options=poisoned(fwd_lean=True, fwd_piece_budget=0.0))
    assert len(seen) == 1
    seen.clear()
    with torch.no_grad():
        lean = poisoned(fwd_lean=True, fwd_piece_budget=1e-9, fwd_piece_min_rows=min_rows)
        out = moba_attention(q, k, v, **kw, options=lean)
    assert len(seen) > 1, "the forward should have run in pieces"
    assert not out.isnan().any()
    assert rel_rms(out, ref) < 1e-5
    assert rel_rms(out, whole) < 1e-6


@pytest.mark.parametrize("magnitude", [1e-4, 1.0, 1e4])
def test_float16_partials_keep_precision(magnitude, device):
    """Partials stored as float16 in the output: values near float16's range or its subnormals stay as
    precise as the float16 output itself (the per-KV-head power-of-two scale): with a gradient, without, lean."""
    lens, hq, hkv, chunk, topk = [96], 2, 1, 8, 6  # 5 merges per query
    q, k, v, cu = make_inputs(lens, hq, hkv, 32, device, seed=3)
    q16, k16, v16 = (x.half() for x in (q, k, v * magnitude))
    layout = make_layout(cu, chunk)
    ref, _ = naive.moba_attention_naive(q16.float(), k16.float(), v16.float(), layout, topk)
    rounding = rel_rms(ref.half().float(), ref)  # the output's own float16 rounding
    for grad, lean in ((False, False), (False, True), (True, False)):
        with torch.set_grad_enabled(grad):
            out = moba_attention(q16, k16, v16, chunk_size=chunk, topk=topk, cu_seqlens=cu, backend="triton",
                                 options=poisoned(fwd_lean=lean))
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        assert rel_rms(out.float(), ref) < 4 * rounding + 1e-4


def test_value_scales_are_powers_of_two():
    v = torch.zeros(5, 3, 4, dtype=torch.bfloat16)
    v[:, 0] = 1e6
    v[:, 1] = -3e-5
    s = fwd.value_scales(v)
    assert s.dtype == torch.float32 and s.shape == (3,)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    scaled = v[:, :2].float().abs().amax(dim=(0, 2)) * s[:2]
    assert scaled.le(2**14).all() and scaled.gt(2**13).all()
    assert s[2] == 2**14  # all zero: nothing to scale
    assert torch.equal(fwd.value_scales(v.float()), torch.ones(3))


def test_pieces_with_dense_prefix(device):
    batch, seq, hq, hkv, chunk, topk = 2, 64, 4, 2, 16, 2
    q, k, v, cu = make_inputs([seq] * batch, hq, hkv, 32, device, seed=9)
    layout = make_layout(cu, chunk)
    ref, _ = naive.moba_attention_naive(q, k, v, layout, topk)
    opts = poisoned(dense_prefix=True, dense_prefix_min_rows=0, cudnn_reference=True, fwd_lean=True,
                    fwd_piece_budget=1e-9, fwd_piece_min_rows=11)
    with torch.no_grad():
        out = moba_attention(*(x.view(batch, seq, *x.shape[1:]) for x in (q, k, v)), chunk_size=chunk, topk=topk,
                             backend="triton", options=opts).view(q.shape)
    assert not out.isnan().any()
    assert rel_rms(out, ref) < 1e-5


def test_dense_prefix_head_pieces():
    """The inference prefix in head pieces: each cuDNN call's new output stays under the budget's share."""
    pre = dense_prefix.Prefix(batch=1, seqlen=131072, rows=49152)  # paper preset at 128K: 37.5% prefix rows
    assert dense_prefix.piece_heads(pre, 32, 8, 0.12) == 8  # GQA 32/8: two KV heads a call, 9.4%
    assert dense_prefix.piece_heads(pre, 8, 8, 0.12) == 2
    assert dense_prefix.piece_heads(pre, 8, 1, 0.12) == 2  # MQA: a divisor of the group
    assert dense_prefix.piece_heads(pre, 1, 1, 0.12) == 1
    assert dense_prefix.piece_heads(pre, 32, 8, 0.0) == 32  # no budget: one call


@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4), (6, 1)])
def test_pieces_with_dense_prefix_in_head_pieces(device, hq, hkv):
    """Lean inference with the prefix split by heads (whole GQA groups, or heads within one group) equals
    the reference; NaN-poisoned outputs show any row or head left unwritten."""
    batch, seq, chunk, topk = 2, 64, 16, 2
    q, k, v, cu = make_inputs([seq] * batch, hq, hkv, 32, device, seed=11)
    ref, _ = naive.moba_attention_naive(q, k, v, make_layout(cu, chunk), topk)
    opts = poisoned(dense_prefix=True, dense_prefix_min_rows=0, cudnn_reference=True, fwd_lean=True,
                    fwd_piece_budget=0.05)
    pre = dense_prefix.Prefix(batch=batch, seqlen=seq, rows=topk * chunk)
    assert dense_prefix.piece_heads(pre, hq, hkv, 0.05) < hq
    with torch.no_grad():
        out = moba_attention(*(x.view(batch, seq, *x.shape[1:]) for x in (q, k, v)), chunk_size=chunk, topk=topk,
                             backend="triton", options=opts).view(q.shape)
    assert not out.isnan().any()
    assert rel_rms(out, ref) < 1e-5
