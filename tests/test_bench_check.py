"""The bench's own correctness machinery: sampled-row references, tie handling, MoBA with FlexAttention."""

import math

import pytest
import torch

from moba_cli import full_attention, moba_attention
from moba_cli.bench.check import Reference, sample_rows, select_rows
from moba_cli.bench.flex_moba import (
    Q_TILE,
    _ordered_keys,
    flex_moba,
    make_mask_mod,
    moba_block_mask_inputs,
    num_words,
)
from moba_cli.ops.moba.layout import make_layout
from moba_cli.ops.moba.naive import block_means, select_blocks

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _qkv(b, s, hq, hkv, d, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g).requires_grad_(grad) for h in (hq, hkv, hkv)]


def test_sampled_rows_include_the_edges():
    b, pos = sample_rows(2, 300, 64, 40, seed=0)
    for seq in (0, 1):
        p = set(pos[b == seq].tolist())
        assert {0, 299, 63, 64, 128, 150} <= p
        assert all(0 <= x < 300 for x in p)
    assert len(set(zip(b.tolist(), pos.tolist(), strict=True))) == len(b)  # no repeats


@pytest.mark.parametrize("kind", ["moba", "dense"])
def test_reference_rows_equal_the_full_reference(kind):
    q, k, v = _qkv(2, 192, 4, 2, 16)
    ref = Reference(q, k, v, chunk=32, topk=3, decode=False, n_rows=400, seed=0)  # every row
    assert len(ref.pos) == 2 * 192
    exp = ref.expected(kind, grads=False)
    if kind == "moba":
        full = moba_attention(q, k, v, chunk_size=32, topk=3, backend="naive")
    else:
        full = full_attention(q, k, v, backend="naive")
    assert torch.allclose(exp.out, full[ref.bidx, ref.pos].float(), atol=1e-5)
    assert exp.keep.all()
    assert ref.check(kind, full).ok


def test_reference_gradients_equal_autograd_through_the_full_reference():
    q, k, v = _qkv(1, 160, 2, 1, 16, grad=True)
    ref = Reference(q.detach(), k.detach(), v.detach(), chunk=32, topk=2, decode=False, n_rows=12, seed=3)
    exp = ref.expected("moba", grads=True)
    do = ref.grad_output("moba", q.shape, q.dtype)
    assert int((do.abs().sum(-1) > 0).sum()) == int(exp.keep.sum())  # zero off the sampled rows
    out = moba_attention(q, k, v, chunk_size=32, topk=2, backend="naive")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    assert torch.allclose(exp.dq, dq[ref.bidx, ref.pos], atol=1e-5)
    assert torch.allclose(exp.dk, dk, atol=1e-5) and torch.allclose(exp.dv, dv, atol=1e-5)
    result = ref.check("moba", out.detach(), (dq, dk, dv))
    assert result.ok and result.grad_err < 1e-5


def test_check_rejects_wrong_outputs_and_gradients():
    q, k, v = _qkv(1, 128, 2, 2, 16, grad=True)
    ref = Reference(q.detach(), k.detach(), v.detach(), chunk=32, topk=2, decode=False, n_rows=64, seed=0)
    own_only = moba_attention(q, k, v, chunk_size=32, topk=1, backend="naive")  # a kernel that ignores the gate
    bad = ref.check("moba", own_only.detach())
    assert not bad.ok and "output off by" in bad.message and bad.out_err > bad.tol_out
    out = moba_attention(q, k, v, chunk_size=32, topk=2, backend="naive")
    do = ref.grad_output("moba", q.shape, q.dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    wrong = ref.check("moba", out.detach(), (dq, 1.5 * dk, dv))
    assert not wrong.ok and "dk" in wrong.message and "dq" not in wrong.message


@pytest.mark.parametrize("where", ["out", "dq", "dv"])
def test_poisoned_outputs_fail_the_check_and_leave_no_nan_in_the_record(where):
    """A NaN anywhere fails the check by name, and the record gets null, never a bare NaN (strict JSON)."""
    import json

    q, k, v = _qkv(1, 96, 2, 1, 16, seed=3, grad=True)
    ref = Reference(q.detach(), k.detach(), v.detach(), chunk=32, topk=2, decode=False, n_rows=48, seed=0)
    out = moba_attention(q, k, v, chunk_size=32, topk=2, backend="naive")
    do = ref.grad_output("moba", q.shape, q.dtype)
    dq, dk, dv = (g.detach().clone() for g in torch.autograd.grad(out, (q, k, v), do))
    out = out.detach().clone()
    row = int(ref.pos[len(ref.pos) // 2])
    {"out": out, "dq": dq, "dv": dv}[where][0, row] = float("nan")
    result = ref.check("moba", out, (dq, dk, dv))
    assert not result.ok
    assert ("NaN" in result.message) if where == "out" else (where in result.message)
    fields = result.fields()
    json.dumps(fields, allow_nan=False)  # raises on NaN/inf
    key = "check_out_err" if where == "out" else "check_grad_err"
    assert fields[key] is None


def test_gate_ties_go_to_the_earlier_block_and_near_ties_are_flagged():
    # Blocks 0 and 2 are identical, so every query scores them equally: the earlier one must win.
    s, chunk, d = 128, 32, 8
    g = torch.Generator().manual_seed(1)
    k = torch.randn(s, 1, d, generator=g)
    k[64:96] = k[0:32]
    q = torch.randn(s, 2, d, generator=g)
    layout = make_layout(torch.tensor([0, s], dtype=torch.int32), chunk)
    naive = select_blocks(q, k, layout, topk=2)
    pos = torch.arange(96, 128)  # block 3: past blocks 0, 1, 2
    chosen, near = select_rows(q[pos], pos, block_means(k, layout), chunk, topk=2)
    for i, p in enumerate(pos.tolist()):
        for h in range(2):
            want = {int(x) for x in naive[p, h].tolist() if x >= 0}
            assert set(chosen[i, h].nonzero().flatten().tolist()) == want
    tie_rows = (naive[96:, :, 1] != 1)  # where block 0/2 won over block 1, the two tie exactly
    assert (near == tie_rows).all() and tie_rows.any()


@pytest.mark.parametrize("hkv", [1, 2])
def test_sampled_row_selection_is_the_reference_rule_even_with_a_nan_key(hkv):
    s, chunk = 160, 16
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(s, 4, 8, generator=g), torch.randn(s, hkv, 8, generator=g)
    k[40, 0, 5] = float("nan")  # block 2: its mean is NaN for KV head 0, which ranks first
    layout = make_layout(torch.tensor([0, s], dtype=torch.int32), chunk)
    for topk in (2, 4):
        naive = select_blocks(q, k, layout, topk=topk)
        pos = torch.tensor([0, 15, 16, 47, 48, 95, 159])
        chosen, _ = select_rows(q[pos], pos, block_means(k, layout), chunk, topk=topk)
        for i, p in enumerate(pos.tolist()):
            for h in range(4):
                want = {int(x) for x in naive[p, h].tolist() if x >= 0}
                assert set(chosen[i, h].nonzero().flatten().tolist()) == want, (topk, p, h)


def test_ordered_keys_rank_like_scores_then_earlier_block():
    scores = torch.tensor([[0.5, -1.0, 0.5, float("-inf"), 2.0, -0.0, 0.0, -3e-38]])
    order = torch.argsort(_ordered_keys(scores), dim=-1, descending=True)[0].tolist()
    assert order == [4, 0, 2, 5, 6, 7, 1, 3]


@pytest.mark.parametrize(
    ("b", "s", "hq", "hkv", "chunk", "topk"),
    [(1, 256, 2, 1, 64, 3), (2, 512, 4, 2, 128, 2), (1, 384, 2, 2, 64, 1), (1, 256, 1, 1, 32, 20)],
)
def test_flex_moba_equals_the_reference(b, s, hq, hkv, chunk, topk):
    q, k, v = _qkv(b, s, hq, hkv, 16, seed=2)
    bits = torch.zeros(b, hq, s, num_words(s, chunk), dtype=torch.int32)
    out = flex_moba(q, k, v, chunk, topk, bits, make_mask_mod(bits, chunk), compiled=False)
    ref = moba_attention(q, k, v, chunk_size=chunk, topk=topk, backend="naive")
    assert torch.allclose(out, ref, atol=1e-5)


def test_flex_block_mask_covers_every_chosen_pair_and_full_tiles_are_full():
    b, s, hq, hkv, chunk, topk = 2, 512, 4, 2, 64, 3
    q, k, _ = _qkv(b, s, hq, hkv, 16, seed=4)
    bits = torch.zeros(b, hq, s, num_words(s, chunk), dtype=torch.int32)
    kv_num, kv_idx, full_num, full_idx = moba_block_mask_inputs(q, k, chunk, topk, bits)
    nb, qt = s // chunk, s // Q_TILE
    listed = torch.zeros(b, hq, qt, nb, dtype=torch.bool)
    full = torch.zeros_like(listed)
    for bi in range(b):
        for h in range(hq):
            for t in range(qt):
                listed[bi, h, t, kv_idx[bi, h, t, : kv_num[bi, h, t]].long()] = True
                full[bi, h, t, full_idx[bi, h, t, : full_num[bi, h, t]].long()] = True
    assert not (listed & full).any()  # a tile-block is either partial or full
    for bi in range(b):
        layout = make_layout(torch.tensor([0, s], dtype=torch.int32), chunk)
        idx = select_blocks(q[bi], k[bi], layout, topk)  # [S, Hq, slots]
        allowed = torch.zeros(s, hq, nb, dtype=torch.bool)  # block-level choice per query
        for slot in range(idx.shape[-1]):
            sel = idx[:, :, slot]
            allowed.scatter_(2, torch.where(sel >= 0, sel, 0).long()[..., None], (sel >= 0)[..., None])
        per_tile = allowed.view(qt, Q_TILE, hq, nb)
        needed = per_tile.any(1).permute(1, 0, 2)  # [Hq, QT, nb]
        assert not (needed & ~(listed[bi] | full[bi])).any()  # nothing chosen is left out
        own = (torch.arange(s) // chunk).view(qt, Q_TILE)
        every = per_tile.all(1).permute(1, 0, 2) & (torch.arange(nb)[None, None, :] < own[None, :, :1])
        assert torch.equal(full[bi], every)  # full exactly where every query chose a past block


@pytest.mark.slow
def test_compiled_flex_moba_uses_the_block_mask_and_equals_the_reference():
    # Compiled, FlexAttention skips tiles the BlockMask leaves out (eager evaluates every pair), so this
    # is the path the GPU runs. About half a minute of compilation on CPU.
    q, k, v = _qkv(1, 1024, 2, 1, 32, seed=5)
    bits = torch.zeros(1, 2, 1024, num_words(1024, 128), dtype=torch.int32)
    out = flex_moba(q, k, v, 128, 3, bits, make_mask_mod(bits, 128), compiled=True)
    ref = moba_attention(q, k, v, chunk_size=128, topk=3, backend="naive")
    assert torch.allclose(out, ref, atol=1e-5)


def test_rel_l2_is_relative_rms_and_never_hides_nan():
    from moba_cli.utils.metrics import rel_l2

    ref = torch.tensor([3.0, 4.0])
    assert rel_l2(ref + torch.tensor([0.3, 0.4]), ref) == pytest.approx(0.1)
    assert math.isnan(rel_l2(torch.tensor([float("nan"), 4.0]), ref))
    assert math.isnan(rel_l2(ref, torch.tensor([float("inf"), 4.0])))
