"""The float32 reference (backend='naive'): the oracle every other backend is tested against.

Checked against independent brute-force loops written here (per query, per head, by hand), and against
dense attention where MoBA must reduce to it.
"""

from __future__ import annotations

import math

import pytest
import torch

from moba_cli.ops.moba import full_attention, make_layout, moba_attention
from moba_cli.ops.moba.naive import moba_attention_naive, select_blocks

HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def qkv(t: int, hq: int, hkv: int, d: int, seed: int = 0, batch: int | None = None):
    lead = (t,) if batch is None else (batch, t)
    return rand(*lead, hq, d, seed=seed), rand(*lead, hkv, d, seed=seed + 1), rand(*lead, hkv, d, seed=seed + 2)


def cu(*lens: int) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


# ---------------------------------------------------------------------------- brute force, one sequence


def brute_choice(q: torch.Tensor, k: torch.Tensor, chunk: int, topk: int) -> list[list[set[int]]]:
    """Blocks each query (row) and head chooses, by the MoBA rule, in plain Python loops.

    q ``[S, Hq, D]``, k ``[S, Hkv, D]``. Score of a past block = q . mean(keys of the block) in float32;
    the own block is always taken; the best ``topk - 1`` complete past blocks, earlier block on ties.
    """
    s, hq, _ = q.shape
    g = hq // k.shape[1]
    out = []
    for i in range(s):
        own = i // chunk
        row = []
        for h in range(hq):
            scored = []
            for b in range(own):  # past blocks are complete: they end before the own block starts
                mean = k[b * chunk : (b + 1) * chunk, h // g].float().mean(0)
                scored.append((float(q[i, h].float() @ mean), b))
            scored.sort(key=lambda t: (-t[0], t[1]))
            row.append({own} | {b for _, b in scored[: topk - 1]})
        out.append(row)
    return out


def brute_attend(q, k, v, chunk: int, choice: list[list[set[int]]], scale: float | None = None) -> torch.Tensor:
    """Causal softmax attention of each query over the keys of its chosen blocks, in float64 loops."""
    s, hq, d = q.shape
    g = hq // k.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    out = torch.zeros(s, hq, d, dtype=torch.float64)
    for i in range(s):
        for h in range(hq):
            keys = [j for j in range(i + 1) if j // chunk in choice[i][h]]
            logits = torch.stack([q[i, h].double() @ k[j, h // g].double() for j in keys]) * scale
            p = torch.softmax(logits, 0)
            out[i, h] = sum(p[n] * v[j, h // g].double() for n, j in enumerate(keys))
    return out


def chosen_sets(block_idx: torch.Tensor, first: int = 0) -> list[list[set[int]]]:
    """``block_idx [S, Hq, slots]`` -> per query and head the set of local blocks (``-1`` slots dropped)."""
    return [[{b - first for b in blk.tolist() if b >= 0} for blk in row] for row in block_idx]


# ---------------------------------------------------------------------------------------- reductions


@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("seqlen", [37, 100])
def test_all_blocks_equals_full_attention_batch(hq, hkv, seqlen):
    q, k, v = qkv(seqlen, hq, hkv, 16, seed=seqlen, batch=2)
    blocks = math.ceil(seqlen / 16)
    ref = full_attention(q, k, v, backend="naive")
    for topk in (blocks, blocks + 5):
        out = moba_attention(q, k, v, chunk_size=16, topk=topk, backend="naive")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hq,hkv", HEADS)
def test_all_blocks_equals_full_attention_varlen(hq, hkv):
    lens = (37, 100, 1, 16, 33)
    q, k, v = qkv(sum(lens), hq, hkv, 16, seed=3)
    c = cu(*lens)
    ref = full_attention(q, k, v, cu_seqlens=c, backend="naive")
    out = moba_attention(q, k, v, chunk_size=16, topk=7, cu_seqlens=c, backend="naive")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # The log-sum-exp it returns is the dense one too.
    _, lse = moba_attention_naive(q, k, v, make_layout(c, 16), 7)
    scale = 1.0 / 4.0
    for s0, s1 in zip(c[:-1].tolist(), c[1:].tolist(), strict=True):
        kk = k[s0:s1].repeat_interleave(hq // hkv, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[s0:s1], kk) * scale
        s = s.masked_fill(torch.ones(s1 - s0, s1 - s0).triu(1).bool(), float("-inf"))
        torch.testing.assert_close(lse[s0:s1], torch.logsumexp(s, -1).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hq,hkv", HEADS)
def test_topk1_is_own_block_attention(hq, hkv):
    q, k, v = qkv(37, hq, hkv, 8, seed=11)
    out = moba_attention(q[None], k[None], v[None], chunk_size=16, topk=1, backend="naive")[0]
    own_only = [[{i // 16}] * hq for i in range(37)]
    torch.testing.assert_close(out.double(), brute_attend(q, k, v, 16, own_only), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("topk", [2, 3])
def test_topk_rule_matches_brute_force(hq, hkv, topk):
    chunk, s = 8, 45  # 6 blocks, the last one partial
    q, k, v = qkv(s, hq, hkv, 8, seed=20 + topk)
    layout = make_layout(cu(s), chunk)
    idx = select_blocks(q, k, layout, topk)
    want = brute_choice(q, k, chunk, topk)
    assert chosen_sets(idx) == want
    # Slot 0 is the own block; past slots come in decreasing score.
    assert (idx[:, :, 0] == torch.arange(s)[:, None] // chunk).all()
    out = moba_attention(q, k, v, chunk_size=chunk, topk=topk, cu_seqlens=cu(s), backend="naive")
    torch.testing.assert_close(out.double(), brute_attend(q, k, v, chunk, want), rtol=1e-5, atol=1e-5)
    # Some queries must actually have skipped blocks, or this test would not test the rule.
    assert any(len(c) < i // chunk + 1 for i, row in enumerate(want) for c in row)


def test_varlen_packed_equals_each_sequence_alone():
    lens = (50, 7, 64, 29)
    q, k, v = qkv(sum(lens), 4, 2, 16, seed=5)
    c = cu(*lens)
    packed = moba_attention(q, k, v, chunk_size=8, topk=3, cu_seqlens=c, backend="naive")
    for s0, s1 in zip(c[:-1].tolist(), c[1:].tolist(), strict=True):
        alone = moba_attention(q[None, s0:s1], k[None, s0:s1], v[None, s0:s1], chunk_size=8, topk=3, backend="naive")
        torch.testing.assert_close(packed[s0:s1], alone[0], rtol=1e-6, atol=1e-6)
    # And the packed selection only names blocks of the query's own sequence, by the per-sequence rule.
    layout = make_layout(c, 8)
    idx = select_blocks(q, k, layout, 3)
    for i, (s0, s1) in enumerate(zip(c[:-1].tolist(), c[1:].tolist(), strict=True)):
        first = int(layout.token_first_block[s0])
        assert chosen_sets(idx[s0:s1], first) == brute_choice(q[s0:s1], k[s0:s1], 8, 3), f"sequence {i}"


def test_tie_earlier_block_wins():
    chunk, d = 4, 8
    k = rand(16, 1, d, seed=1)
    k[4:8] = k[0:4]  # blocks 0 and 1 have identical keys, so identical means: an exact tie
    k[8:12] = -k[0:4]  # block 2 scores the opposite sign: strictly worse for a query aligned with block 0
    v = rand(16, 1, d, seed=2)
    v[4:8] += 3.0  # different values, so the output shows which tied block was taken
    q = rand(16, 1, d, seed=3)
    q[12:] = k[0:4].mean(0) * 4  # queries in block 3 point at the tied blocks' mean
    layout = make_layout(cu(16), chunk)
    idx = select_blocks(q, k, layout, 2)
    assert (idx[12:, 0, 1] == 0).all(), idx[12:, 0]
    out = moba_attention(q[None], k[None], v[None], chunk_size=chunk, topk=2, backend="naive")[0]
    # brute_attend indexes keys by row number, so run it on the whole sequence and keep rows 12..15.
    full_choice = [[{i // chunk}] for i in range(12)] + [[{0, 3}]] * 4
    want = brute_attend(q, k, v, chunk, full_choice)[12:]
    torch.testing.assert_close(out[12:].double(), want, rtol=1e-5, atol=1e-5)
    wrong = brute_attend(q, k, v, chunk, [[{i // chunk}] for i in range(12)] + [[{1, 3}]] * 4)[12:]
    assert (out[12:].double() - wrong).abs().max() > 1e-2


def test_future_blocks_never_chosen():
    lens = (40, 24)
    q, k, v = qkv(sum(lens), 2, 1, 8, seed=9)
    # Make later blocks irresistible: every query points along u, and so do the keys of later blocks.
    u = rand(8, seed=10)
    q = u + 0.1 * q
    k[20:40] = 50 * u
    k[52:64] = 50 * u
    c = cu(*lens)
    layout = make_layout(c, 4)
    idx = select_blocks(q, k, layout, 4).long()
    own = layout.token_block.long()[:, None, None]
    first = layout.token_first_block.long()[:, None, None]
    valid = idx >= 0
    assert (idx[valid] <= own.expand_as(idx)[valid]).all()
    assert (idx[..., 1:][valid[..., 1:]] < own.expand_as(idx[..., 1:])[valid[..., 1:]]).all()
    assert (idx[valid] >= first.expand_as(idx)[valid]).all()  # never a block of an earlier sequence
    # Queries with at least 3 past blocks fill all slots; the first block's queries have none.
    assert valid[:4, :, 1:].sum() == 0
    assert valid[16:40].all()


def test_gradients_flow_and_not_through_selection():
    q, k, v = (t.requires_grad_() for t in qkv(48, 4, 2, 8, seed=13))
    c = cu(48)
    out = moba_attention(q, k, v, chunk_size=8, topk=2, cu_seqlens=c, backend="naive")
    w = rand(*out.shape, seed=14)
    (out * w).sum().backward()
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.grad is not None and torch.isfinite(t.grad).all(), name
        assert t.grad.abs().sum() > 0, name
    # The same loss through attention on a *fixed* mask of the chosen blocks: equal gradients mean the
    # selection contributes none (it is a discrete choice made without gradient).
    layout = make_layout(c, 8)
    idx = select_blocks(q.detach(), k.detach(), layout, 2)
    assert not idx.requires_grad
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    allowed = torch.zeros(48, 4, 48, dtype=torch.bool)
    for i in range(48):
        for h in range(4):
            for b in idx[i, h].tolist():
                if b >= 0:
                    allowed[i, h, b * 8 : min(b * 8 + 8, i + 1)] = True
    kk, vv = k2.repeat_interleave(2, 1), v2.repeat_interleave(2, 1)
    s = torch.einsum("qhd,khd->qhk", q2, kk) / math.sqrt(8)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    ref = torch.einsum("qhk,khd->qhd", p, vv)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (ref * w).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hkv", [2, 1])
def test_gqa_equals_mha_with_repeated_kv(hkv):
    hq = 4
    q, k, v = qkv(40, hq, hkv, 8, seed=30, batch=2)
    out = moba_attention(q, k, v, chunk_size=8, topk=2, backend="naive")
    rep = hq // hkv
    mha = moba_attention(
        q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2), chunk_size=8, topk=2, backend="naive"
    )
    torch.testing.assert_close(out, mha, rtol=1e-6, atol=1e-6)
    # Non-contiguous K/V views (every other head of a larger tensor) give the same result.
    big_k = torch.stack([k, torch.zeros_like(k)], 3).flatten(2, 3)
    big_v = torch.stack([v, torch.zeros_like(v)], 3).flatten(2, 3)
    k_view, v_view = big_k[:, :, ::2], big_v[:, :, ::2]
    assert not k_view.is_contiguous()
    out_view = moba_attention(q, k_view, v_view, chunk_size=8, topk=2, backend="naive")
    torch.testing.assert_close(out_view, out, rtol=0, atol=0)
    # An MQA key expanded to every head (stride 0) equals the MQA call itself.
    if hkv == 1:
        exp = moba_attention(q, k.expand(-1, -1, hq, -1), v.expand(-1, -1, hq, -1), chunk_size=8, topk=2,
                             backend="naive")
        torch.testing.assert_close(exp, out, rtol=1e-6, atol=1e-6)


def test_low_precision_inputs_keep_dtype_and_compute_in_float32():
    q, k, v = qkv(33, 2, 2, 16, seed=40, batch=1)
    for dt, tol in ((torch.bfloat16, 8e-3), (torch.float16, 1e-3)):
        ql, kl, vl = q.to(dt), k.to(dt), v.to(dt)
        out = moba_attention(ql, kl, vl, chunk_size=8, topk=2, backend="naive")
        assert out.dtype == dt and out.shape == q.shape
        # The same rounded inputs in float32: same gate, so only the output's rounding differs.
        ref = moba_attention(ql.float(), kl.float(), vl.float(), chunk_size=8, topk=2, backend="naive")
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(0, 8, 2, 16), (2, 0, 2, 16)])
def test_empty_batch_or_length(shape):
    # B = 0 or S = 0: an empty result (as the Triton backend gives), with empty gradients.
    q = torch.randn(*shape, requires_grad=True)
    out = moba_attention(q, q, q, chunk_size=4, topk=2, backend="naive")
    assert out.shape == shape
    out.sum().backward()
    assert q.grad.shape == shape


def test_empty_packed_batch():
    q = torch.randn(0, 2, 16)
    cu = torch.tensor([0, 0, 0], dtype=torch.int32)
    assert moba_attention(q, q, q, chunk_size=4, topk=2, cu_seqlens=cu, backend="naive").shape == (0, 2, 16)


@pytest.mark.parametrize("topk", [2, 3])
def test_nan_key_reaches_the_output_like_dense_attention(topk):
    # A NaN key makes its block's gate score NaN: that block ranks first (as in the Triton gate's integer
    # keys), so every later query that attends it is NaN, as in dense attention; earlier rows stay finite.
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 37, 2, 16, generator=g) for _ in range(3))
    k[0, 5, 0, 3] = float("nan")
    out = moba_attention(q, k, v, chunk_size=4, topk=topk, backend="naive")
    dense = full_attention(q, k, v, backend="naive")
    assert torch.equal(out.isnan().any(-1), dense.isnan().any(-1))
    assert out[0, 5:, 0].isnan().all() and not out[0, :5].isnan().any()
