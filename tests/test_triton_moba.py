"""Triton MoBA kernels against the float32 reference (CPU: Triton interpreter, tiny sizes).

Pattern follows flash-linear-attention's op tests: fixed seed, odd lengths, varlen batches, forward and
dq/dk/dv, relative-RMS asserts, every kernel-written buffer poisoned with NaN beforehand.
"""

from __future__ import annotations

import pytest
import torch
from utils import POISON, make_inputs, poisoned, rel_rms

from moba_cli import full_attention, moba_attention
from moba_cli.errors import MobaError
from moba_cli.ops.moba import KernelOptions, naive
from moba_cli.ops.moba.bwd import bwd_gluon, gluon_available
from moba_cli.ops.moba.dense import dense_causal
from moba_cli.ops.moba.gate import gate_kind as pick_gate_kind
from moba_cli.ops.moba.gate import select_blocks
from moba_cli.ops.moba.layout import make_layout
from moba_cli.ops.moba.schedule import BwdLists, Schedule


def check_against_reference(lens, hq, hkv, d, chunk, topk, device, tol=1e-4, opts=POISON):
    q, k, v, cu = make_inputs(lens, hq, hkv, d, device)
    layout = make_layout(cu, chunk)
    sel_ref = naive.select_blocks(q, k, layout, topk)
    sel = select_blocks(q, k, layout, topk, opts)
    assert torch.equal(sel.sort(-1).values, sel_ref.sort(-1).values), "gate chose different blocks"

    qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
    out = moba_attention(qt, kt, vt, chunk_size=chunk, topk=topk, cu_seqlens=cu, backend="triton", options=opts)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref, _ = naive.moba_attention_naive(qr, kr, vr, layout, topk)
    assert not out.isnan().any()
    assert rel_rms(out, ref) < tol
    do = torch.randn_like(ref)
    out.backward(do)
    ref.backward(do)
    for name, a, b in (("dq", qt.grad, qr.grad), ("dk", kt.grad, kr.grad), ("dv", vt.grad, vr.grad)):
        assert not a.isnan().any(), name
        assert rel_rms(a, b) < tol, name


@pytest.mark.parametrize(
    ("lens", "hq", "hkv", "chunk", "topk"),
    [
        ([50], 4, 4, 16, 2),  # MHA, partial last block
        ([77], 4, 2, 16, 3),  # GQA, odd length
        ([13, 50, 38], 2, 1, 16, 2),  # MQA, varlen with a sequence shorter than a block
        ([45], 2, 2, 16, 1),  # own block only
        ([40, 23], 2, 1, 20, 2),  # chunk not a multiple of the kernel tile
        ([33], 2, 2, 5, 3),  # chunk smaller than a tile
        ([70], 2, 2, 32, 2),  # several key tiles per block
    ],
)
def test_matches_reference(lens, hq, hkv, chunk, topk, device):
    check_against_reference(lens, hq, hkv, 32, chunk, topk, device)


@pytest.mark.parametrize(("lens", "hq", "hkv", "chunk", "topk"), [([70], 2, 2, 32, 2), ([13, 50, 38], 2, 1, 16, 2)])
def test_forward_through_tma_descriptors(lens, hq, hkv, chunk, topk, device):
    # The Hopper path loads unmasked K/V tiles through tensor descriptors; the interpreter runs it too.
    check_against_reference(lens, hq, hkv, 32, chunk, topk, device, opts=poisoned(fwd_desc=True))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(("lens", "hq", "hkv", "chunk", "topk"), [([77], 4, 2, 16, 3), ([13, 50, 38], 2, 1, 16, 2)])
def test_backward_paths(lens, hq, hkv, chunk, topk, fused, device):
    # dQ from atomics in the dK/dV kernel (fused) and from its own slot-wise pass: both against the reference.
    check_against_reference(lens, hq, hkv, 32, chunk, topk, device, opts=poisoned(bwd_fused=fused))


def test_bwd_fused_knob(monkeypatch):
    monkeypatch.setenv("MOBA_BWD_FUSED", "0")
    assert KernelOptions.from_env().bwd_fused is False
    monkeypatch.setenv("MOBA_BWD_FUSED", "yes")
    with pytest.raises(MobaError, match="MOBA_BWD_FUSED"):
        KernelOptions.from_env()


def test_bwd_gluon_knob(monkeypatch):
    # The Gluon backward applies only to CUDA Hopper tensors (bf16, head dim 128): never on CPU or
    # under the interpreter, whatever the knob says; a bad value is an error, not a silent default.
    q = torch.zeros(4, 2, 128, dtype=torch.bfloat16)
    for value in ("0", "1"):
        monkeypatch.setenv("MOBA_BWD_GLUON", value)
        assert KernelOptions.from_env().bwd_gluon is (value == "1")
        assert bwd_gluon(q, KernelOptions.from_env()) is False
    monkeypatch.setenv("MOBA_BWD_GLUON", "on")
    with pytest.raises(MobaError, match="MOBA_BWD_GLUON"):
        KernelOptions.from_env()


def test_gluon_launch_matches_kernel_signature(monkeypatch):
    # The Gluon backward only runs on a Hopper GPU; on CPU, check that its launcher passes every kernel
    # argument exactly once (positionally or by name) and sizes the grid as the Triton kernel's.
    from types import SimpleNamespace

    if not gluon_available():
        pytest.skip("this Triton has no Gluon API the kernel can use")
    from moba_cli.ops.moba import gluon_bwd

    calls = []

    class Recorder:
        def warmup(self, *args, grid, **kwargs):  # the launcher compiles first (gluon_compat fallback)
            pass

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    names = gluon_bwd.bwd_dkdv_kernel.arg_names
    monkeypatch.setattr(gluon_bwd, "bwd_dkdv_kernel", Recorder())
    monkeypatch.setattr(gluon_bwd, "_COMPILED", set())
    t, hq, hkv, d = 300, 8, 2, 128
    q = torch.zeros(t, hq, d, dtype=torch.bfloat16)
    kv = torch.zeros(t, hkv, d, dtype=torch.bfloat16)
    ints = torch.zeros(t, dtype=torch.int32)
    lists = SimpleNamespace(pair_t=ints, group_off=ints, group_cnt=ints)
    layout = SimpleNamespace(chunk_size=200, num_blocks=2, block_start=ints, block_end=ints)
    assert gluon_bwd.launch(q, kv, kv, q, ints.float(), ints.float(), kv, kv, q.float(), lists, layout, 0.1, 1.4)
    (grid, args, kwargs), = calls
    assert list(names[: len(args)]) + sorted(kwargs) == list(names[: len(args)]) + sorted(names[len(args):])
    assert grid == (2 * 2, hkv)  # 2 blocks x ceil(200 / 128) key tiles, one program column per KV head
    assert kwargs["G"] == 4 and kwargs["EVEN"] is False


@pytest.mark.parametrize(("name", "value"), [("MOBA_FWD_CFG", "128,64"), ("MOBA_BWD_CFG", "64,x,4,2"),
                                             ("MOBA_GATE_CFG", "64,16"), ("MOBA_GATE_CFG", "64,16,0")])
def test_tuning_knobs_reject_bad_values(name, value, monkeypatch):
    monkeypatch.setenv(name, value)
    with pytest.raises(MobaError, match=name):
        KernelOptions.from_env()


def test_tuning_knobs_are_read_into_options(monkeypatch):
    monkeypatch.setenv("MOBA_FWD_CFG", "32,16,4,2")
    monkeypatch.setenv("MOBA_GATE_CFG", "16,16,4")
    monkeypatch.setenv("MOBA_OWN_SPLITS", "2")
    opts = KernelOptions.from_env()
    assert (opts.fwd_cfg, opts.gate_cfg, opts.own_splits, opts.bwd_cfg) == ((32, 16, 4, 2), (16, 16, 4), 2, None)
    with pytest.raises(MobaError, match="fwd_cfg"):
        KernelOptions(fwd_cfg=(64, 64))


def test_head_dim_64(device):
    check_against_reference([41], 2, 1, 64, 16, 2, device)


def test_streaming_topk_over_many_blocks(device):
    # 26 blocks and a 16-wide candidate tile: the sort gate merges several tiles.
    q, k, v, cu = make_inputs([205], 2, 1, 32, device, seed=3)
    layout = make_layout(cu, 8)
    sel = select_blocks(q, k, layout, 5, poisoned(gate_kind="sort"))
    ref = naive.select_blocks(q, k, layout, 5)
    assert torch.equal(sel.sort(-1).values, ref.sort(-1).values)
    # Future blocks are never chosen and the own block sits in slot 0.
    own = layout.token_block[:, None]
    assert torch.equal(sel[:, :, 0], own.expand(-1, 2))
    assert bool(((sel[:, :, 1:] < own[:, :, None]) | (sel[:, :, 1:] == -1)).all())


@pytest.fixture(params=["grouped", "sort"])
def gate_opts(request):
    """Both gate kernels, whichever the size would pick."""
    return poisoned(gate_kind=request.param)


@pytest.mark.parametrize(
    ("kind", "lens", "chunk", "topk"),
    [
        ("grouped", [150], 1, 8),  # 150 blocks: many groups, kept groups replaced again and again
        ("grouped", [150], 1, 17),  # 16 past blocks: the largest kept-group count of the grouped gate
        ("grouped", [61, 7, 80], 1, 5),  # varlen: tiles hold rows of two sequences with different block ranges
        ("grouped", [40], 2, 2),  # one past block
        # The sort gate (above 16 past blocks) on small cases: the interpreter runs tl.sort op by op.
        ("sort", [61, 7, 80], 1, 5),
        ("sort", [40], 2, 2),
    ],
)
def test_gate_kernels_match_reference(kind, lens, chunk, topk, device):
    # The interpreter runs tl.sort op by op: few programs (2 heads, short sequences), many blocks.
    q, k, _, cu = make_inputs(lens, 2, 1, 16, device, seed=5)
    layout = make_layout(cu, chunk)
    sel = select_blocks(q, k, layout, topk, poisoned(gate_kind=kind))
    ref = naive.select_blocks(q, k, layout, topk)
    assert torch.equal(sel.sort(-1).values, ref.sort(-1).values)
    assert torch.equal(sel[:, :, 0], layout.token_block[:, None].expand(-1, 2))


def test_gate_best_blocks_in_one_group(gate_opts, device):
    # Every query prefers blocks 33..39, which share one 16-block tile: the grouped gate must keep that
    # tile's scores whole, not one block per tile.
    g = torch.Generator().manual_seed(6)
    t, chunk = 80, 1
    u = torch.randn(16, generator=g)
    q = (u + 0.1 * torch.randn(t, 1, 16, generator=g)).to(device)
    k = torch.randn(t, 1, 16, generator=g)
    for b in range(33, 40):
        k[b * chunk:(b + 1) * chunk, 0] += (3.0 + 0.1 * b) * u
    k = k.to(device)
    layout = make_layout(torch.tensor([0, t], dtype=torch.int32, device=device), chunk)
    sel = select_blocks(q, k, layout, 8, gate_opts)
    ref = naive.select_blocks(q, k, layout, 8)
    assert torch.equal(sel.sort(-1).values, ref.sort(-1).values)
    late = sel[48:, :, 1:].sort(-1).values  # queries from block 48 on choose exactly blocks 33..39
    assert torch.equal(late, torch.arange(33, 40, dtype=late.dtype, device=late.device).expand_as(late))


def test_gate_kind_follows_the_measured_rule(monkeypatch):
    assert pick_gate_kind(7, 4096) == "grouped"  # flashmoba: 4096 blocks, 7 kept
    assert pick_gate_kind(7, 256) == "sort"  # few tiles per row: the final selection dominates
    assert pick_gate_kind(11, 4096) == "sort"  # 16 kept groups: too many kept scores
    monkeypatch.setenv("MOBA_GATE_KIND", "grouped")
    forced = KernelOptions.from_env().gate_kind
    assert pick_gate_kind(11, 256, forced) == "grouped"
    assert pick_gate_kind(40, 4096, forced) == "sort"  # beyond what the grouped kernel keeps
    monkeypatch.setenv("MOBA_GATE_KIND", "fast")
    with pytest.raises(MobaError, match="MOBA_GATE_KIND"):
        KernelOptions.from_env()


def test_gate_tie_rule_prefers_earlier_block(gate_opts, device):
    q, k, v, cu = make_inputs([64], 1, 1, 32, device, seed=1)
    k[16:32] = k[0:16]  # blocks 0 and 1 get identical means: an exact tie for every query
    layout = make_layout(cu, 16)
    sel = select_blocks(q, k, layout, 2, gate_opts)
    ref = naive.select_blocks(q, k, layout, 2)
    assert torch.equal(sel.sort(-1).values, ref.sort(-1).values)
    tied = sel[48:, 0, 1]  # queries in block 3: choose one of blocks 0, 1, 2
    assert not bool((tied == 1).any()), "block 1 ties block 0 and must lose to the earlier block"
    # Three identical blocks and two places: the two earliest of the tied blocks win.
    k[32:48] = k[0:16]
    sel = select_blocks(q, k, layout, 3, gate_opts)
    ref = naive.select_blocks(q, k, layout, 3)
    assert torch.equal(sel.sort(-1).values, ref.sort(-1).values)


@pytest.mark.parametrize(("lens", "hq", "hkv"), [([60], 4, 2), ([9, 40], 2, 1)])
def test_topk_covering_all_blocks_is_full_attention(lens, hq, hkv, device):
    q, k, v, cu = make_inputs(lens, hq, hkv, 32, device, seed=2)
    out = moba_attention(q, k, v, chunk_size=16, topk=64, cu_seqlens=cu, backend="triton", options=POISON)
    full = full_attention(q, k, v, cu_seqlens=cu, backend="naive")
    assert rel_rms(out, full) < 1e-5


def test_batch_layout_matches_packed(device):
    q, k, v, cu = make_inputs([48, 48], 2, 2, 32, device, seed=4)
    packed = moba_attention(q, k, v, chunk_size=16, topk=2, cu_seqlens=cu, backend="triton", options=POISON)
    batched = moba_attention(
        q.view(2, 48, 2, 32), k.view(2, 48, 2, 32), v.view(2, 48, 2, 32), chunk_size=16, topk=2, backend="triton",
        options=POISON,
    )
    assert torch.equal(batched.view(96, 2, 32), packed)



@pytest.mark.parametrize(("lens", "batched"), [([48, 48], True), ([9, 40, 0, 23], False)])
def test_dense_shortcut_is_full_attention(lens, batched):
    # The shortcut itself runs on any device (SDPA); moba_attention only takes it on CUDA.
    q, k, v, cu = make_inputs(lens, 4, 2, 32, "cpu", seed=6)
    ref = full_attention(q, k, v, cu_seqlens=cu, backend="naive")
    if batched:
        out = dense_causal(*(x.view(2, 48, *x.shape[1:]) for x in (q, k, v)), None, 32**-0.5)
        out = out.reshape(ref.shape)
    else:
        out = dense_causal(q, k, v, cu.tolist(), 32**-0.5)
    assert rel_rms(out, ref) < 1e-5


@pytest.mark.parametrize("wide_keys", [False, True])
def test_schedule_lists_every_pair_once(wide_keys, device):
    # The schedule is built without host syncs: the launch grid is a bound, and each slot's tiles must still
    # cover its (token, head) pairs exactly once, tokens in order within a block's list. wide_keys pads the
    # block count so the group keys no longer fit 16 bits (the 32-bit sort path).
    lens, hq, chunk, topk, bm = [50, 7, 77], 3, 8, 4, 16
    q, k, _, cu = make_inputs(lens, hq, 1, 16, device, seed=9)
    layout = make_layout(cu, chunk)
    sel = select_blocks(q, k, layout, topk, POISON)
    nb = layout.num_blocks + (2**15 if wide_keys else 0)
    sched = Schedule(sel, nb, bm)
    assert sched.block_idx is sel
    t_total, h, s = sel.shape
    first = sched.slot_first.tolist()
    seen = torch.zeros_like(sel)
    for slot in range(s):
        assert 0 <= first[slot + 1] - first[slot] <= sched.tiles_bound
        for tile in range(first[slot], first[slot + 1]):
            g, off = int(sched.tile_group[tile]), int(sched.tile_off[tile])
            assert g // (h * nb) == slot
            head, blk = (g // nb) % h, g % nb
            cnt, base = int(sched.group_cnt[g]) - off, int(sched.group_off[g]) + off
            toks = sched.pair_t[base:base + min(bm, cnt)].long()
            assert 0 < len(toks) <= bm and bool((toks[1:] > toks[:-1]).all())
            assert bool((sel[toks, head, slot] == blk).all())
            seen[toks, head, slot] += 1
    assert torch.equal(seen, (sel >= 0).to(seen.dtype))


@pytest.mark.parametrize("skip_first", [False, True])
def test_backward_lists_per_block(skip_first, device):
    # The dK/dV kernels' lists: per (head, block) the block's own queries (all of its tokens, in order),
    # then right after them every query that chose it as a past block, in token order; each valid pair
    # once. skip_first leaves the first two blocks' tokens of every sequence out (the dense prefix).
    lens, hq, chunk, topk = [50, 7, 77], 3, 8, 4
    q, k, _, cu = make_inputs(lens, hq, 1, 16, device, seed=11)
    layout = make_layout(cu, chunk)
    sel = select_blocks(q, k, layout, topk, POISON)
    skip = (layout.token_block - layout.token_first_block) < 2 if skip_first else None
    lists = BwdLists(sel, layout.num_blocks, skip)
    nb, starts, ends = layout.num_blocks, layout.block_start.tolist(), layout.block_end.tolist()
    seen = torch.zeros_like(sel)
    for h in range(hq):
        for j in range(nb):
            g = 2 * (h * nb + j)
            off, n_own, n_past = (int(x) for x in (lists.group_off[g], lists.group_cnt[g], lists.group_cnt[g + 1]))
            assert int(lists.group_off[g + 1]) == off + n_own  # the past run follows the own run
            own = lists.pair_t[off:off + n_own].long()
            past = lists.pair_t[off + n_own:off + n_own + n_past].long()
            block_toks = torch.arange(starts[j], ends[j], device=own.device)
            if skip is not None and bool(skip[starts[j]]):
                block_toks = block_toks[:0]
            assert torch.equal(own, block_toks)  # row m of the own run is token block_start + m
            assert bool((past[1:] > past[:-1]).all()) and bool((sel[past, h, 1:] == j).any(-1).all())
            seen[own, h, 0] += 1
            for t in past.tolist():
                seen[t, h, 1:][sel[t, h, 1:] == j] += 1
    want = (sel >= 0).to(seen.dtype)
    if skip is not None:
        want[skip] = 0
    assert torch.equal(seen, want)


def test_layout_cache(device):
    from moba_cli.ops.moba import layout as lay

    lay.clear_layout_cache()
    a = lay.cached_layout([0, 40, 90], 16, torch.device(device))
    assert lay.cached_layout([0, 40, 90], 16, torch.device(device)) is a
    ref = make_layout(torch.tensor([0, 40, 90], dtype=torch.int32, device=device), 16)
    for name in ("cu_seqlens", "block_start", "block_end", "token_block", "token_first_block"):
        assert torch.equal(getattr(a, name), getattr(ref, name)), name
    assert (a.num_blocks, a.max_blocks, a.chunk_size) == (ref.num_blocks, ref.max_blocks, ref.chunk_size)
    for n in range(lay.CACHE_SIZE):
        lay.cached_layout([0, 10 + n], 16, torch.device(device))
    assert lay.cached_layout([0, 40, 90], 16, torch.device(device)) is not a  # evicted, rebuilt
    lay.clear_layout_cache()
    assert not lay._CACHE
