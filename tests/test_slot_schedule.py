"""One slot's schedule for the lean inference forward (ops/moba/slot_schedule.py) against the stable sort's
:class:`Schedule` of that slot: the own-block slot from the block ranges, the past-block slots from the
counting-sort kernel (under the interpreter on CPU), and the fallback to the sort."""

from __future__ import annotations

import functools

import pytest
import torch
from utils import make_inputs

from moba_cli.ops.moba import slot_schedule
from moba_cli.ops.moba.gate import select_blocks
from moba_cli.ops.moba.layout import BlockLayout, make_layout
from moba_cli.ops.moba.schedule import Schedule, tile_lists
from moba_cli.ops.moba.slot_schedule import SlotSchedule, count_plan

BLOCK_M = 16


@pytest.fixture
def small_tiles(monkeypatch):
    """Row tiles of 32+ rows walked 16 at a time, so small inputs span several tiles and steps."""
    monkeypatch.setattr(slot_schedule, "MIN_BLOCK", 32)
    monkeypatch.setattr(slot_schedule, "SUB", 16)


def reference(sel: torch.Tensor, slot: int, layout: BlockLayout, row0: int, skip) -> Schedule:
    """The stable sort's schedule of one slot, its tokens made absolute (as the forward used it)."""
    ref = Schedule(sel[:, :, slot:slot + 1], layout.num_blocks, BLOCK_M, skip)
    ref.pair_t += row0
    return ref


def group_lists(pair_t: torch.Tensor, off: torch.Tensor, cnt: torch.Tensor) -> torch.Tensor:
    """Every group's tokens, the groups one after another."""
    cnt = cnt.long()
    start = torch.repeat_interleave(off.long() - (torch.cumsum(cnt, 0) - cnt), cnt)
    return pair_t[start + torch.arange(int(cnt.sum()))]


def assert_same(got: SlotSchedule, ref: Schedule, slot: int, skip: torch.Tensor | None) -> None:
    """Equal group lists and tiles; past-block slots equal bit for bit over the listed pairs. The own-block
    slot lists the rows once for all heads (skipped rows too, in no group), so its offsets differ."""
    n = int(ref.group_cnt.sum())
    assert got.slots == 1 and got.block_idx is None
    assert (got.heads, got.num_blocks, got.block_m) == (ref.heads, ref.num_blocks, ref.block_m)
    for name in ("group_cnt", "slot_first", "tile_group", "tile_off", "group_off", "pair_t"):
        assert getattr(got, name).dtype == torch.int32, name
    assert torch.equal(got.group_cnt, ref.group_cnt)
    assert torch.equal(got.slot_first, ref.slot_first)
    assert got.tiles_bound == ref.tiles_bound
    assert torch.equal(got.tile_group, ref.tile_group)
    assert torch.equal(got.tile_off, ref.tile_off)
    assert torch.equal(group_lists(got.pair_t, got.group_off, got.group_cnt), ref.pair_t[:n])
    if slot:
        assert torch.equal(got.group_off, ref.group_off)
        assert torch.equal(got.pair_t[:n], ref.pair_t[:n])
        return
    assert got.pair_t.numel() * ref.heads == ref.pair_t.numel()
    if skip is None:  # the sort's heads follow one another
        heads = torch.arange(ref.heads).repeat_interleave(ref.num_blocks).to(torch.int32)
        assert torch.equal(got.group_off + heads * (n // ref.heads), ref.group_off)


def check_every_slot(sel: torch.Tensor, layout: BlockLayout, row0: int, skip: torch.Tensor | None) -> None:
    """:func:`assert_same` for every slot of ``sel [rows, H, S]`` (tokens ``row0 ..``)."""
    for s in range(sel.shape[2]):
        assert_same(SlotSchedule(sel, s, layout, BLOCK_M, row0, skip), reference(sel, s, layout, row0, skip), s, skip)


def random_sel(layout: BlockLayout, heads: int, slots: int, rows: slice, dtype: torch.dtype,
               seed: int) -> torch.Tensor:
    """Block lists as the gate fills them: the own block in slot 0, then past blocks of the query's
    sequence or -1."""
    g = torch.Generator().manual_seed(seed)
    tb, fb = layout.token_block[rows].long(), layout.token_first_block[rows].long()
    n = tb.numel()
    span = (tb - fb)[:, None, None]
    past = fb[:, None, None] + (torch.rand(n, heads, slots - 1, generator=g) * span).long()
    empty = (span == 0) | (torch.rand(n, heads, slots - 1, generator=g) < 0.25)
    past = torch.where(empty, torch.full_like(past, -1), past)
    return torch.cat([tb[:, None, None].expand(n, heads, 1), past], 2).to(dtype)


@functools.cache
def gate_lists(lens: tuple[int, ...], hq: int, hkv: int, chunk: int, topk: int,
               piece: tuple[int, int] | None) -> tuple[BlockLayout, slice, torch.Tensor]:
    """The gate's int32 block lists of random inputs for the rows of ``piece`` (all if None); the gate is
    slow under the interpreter, so each is made once."""
    q, k, _, cu = make_inputs(list(lens), hq, hkv, 16, "cpu", seed=len(lens) + hq)
    layout = make_layout(cu, chunk)
    rows = slice(*piece) if piece else slice(0, q.shape[0])
    return layout, rows, select_blocks(q, k, layout, topk, rows=rows)


CASES = [
    ([120], 4, 4, 16, 4),  # MHA
    ([100], 4, 2, 8, 5),  # GQA
    ([50, 13, 64, 7], 4, 2, 8, 4),  # varlen, odd lengths, blocks that do not divide them
    ([77, 33], 2, 1, 10, 3),  # MQA, varlen
]


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("piece", [None, (37, 101)])
@pytest.mark.parametrize("with_skip", [False, True])
@pytest.mark.parametrize(("lens", "hq", "hkv", "chunk", "topk"), CASES)
def test_gate_lists_match_the_sort(lens, hq, hkv, chunk, topk, with_skip, piece, dtype, small_tiles):
    layout, rows, sel = gate_lists(tuple(lens), hq, hkv, chunk, topk, piece)
    sel = sel.to(dtype)
    # the dense prefix's rule: the first blocks of every sequence are left out
    skip = ((layout.token_block - layout.token_first_block) < 2)[rows] if with_skip else None
    assert count_plan(sel.shape[0], layout.num_blocks) is not None  # the counting sort, not the fallback
    check_every_slot(sel, layout, rows.start, skip)


@pytest.mark.parametrize("piece", [None, (700, 2600)])
@pytest.mark.parametrize("with_skip", [False, True])
def test_random_lists_match_the_sort(piece, with_skip):
    """Default tile sizes: two row tiles of 64-row steps, three heads, many blocks."""
    layout = make_layout(torch.tensor([0, 1001, 1034, 2999], dtype=torch.int32), 24)
    rows = slice(*piece) if piece else slice(0, 2999)
    sel = random_sel(layout, 3, 5, rows, torch.int16, seed=7)
    skip = ((layout.token_block - layout.token_first_block) < 3)[rows] if with_skip else None
    assert count_plan(sel.shape[0], layout.num_blocks)[1] == 2 - (piece is not None)
    check_every_slot(sel, layout, rows.start, skip)


def test_counting_sort_lists_every_pair_once(small_tiles):
    """Without the sort to compare to: the listed pairs of a past slot are exactly its (head, block, token)
    pairs, each once, tokens ascending within a group, groups back to back."""
    layout = make_layout(torch.tensor([0, 90, 301], dtype=torch.int32), 6)
    row0, row1 = 17, 290
    sel = random_sel(layout, 3, 4, slice(row0, row1), torch.int32, seed=3)
    nb = layout.num_blocks
    for s in (1, 2, 3):
        got = SlotSchedule(sel, s, layout, BLOCK_M, row0)
        cnt = got.group_cnt.long()
        n = int(cnt.sum())
        assert torch.equal(got.group_off.long(), torch.cumsum(cnt, 0) - cnt)
        group = torch.repeat_interleave(torch.arange(cnt.numel()), cnt)
        listed = group * 2**20 + got.pair_t[:n].long()
        t, h = torch.nonzero(sel[:, :, s] >= 0, as_tuple=True)
        expected = (h * nb + sel[t, h, s].long()) * 2**20 + row0 + t
        assert torch.equal(torch.sort(listed).values, torch.sort(expected).values)
        assert torch.equal(listed, torch.sort(listed).values)  # token order within each group
        assert listed.unique().numel() == n


def test_small_piece_falls_back_to_the_sort(monkeypatch):
    """A piece with fewer than two rows per block of the batch: the count buffer would outgrow the token
    list, so the slot is sorted."""
    layout = make_layout(torch.tensor([0, 256], dtype=torch.int32), 4)  # 64 blocks
    row0, row1 = 60, 160
    assert count_plan(row1 - row0, layout.num_blocks) is None
    assert count_plan(128, 64) is not None

    class Never:
        def __getitem__(self, grid):
            raise AssertionError("the counting kernel ran")

    monkeypatch.setattr(slot_schedule, "_slot_count_kernel", Never())
    sel = random_sel(layout, 2, 3, slice(row0, row1), torch.int16, seed=5)
    skip = torch.zeros(row1 - row0, dtype=torch.bool)
    skip[:20] = True  # (not whole blocks: the sort takes any)
    for s in (1, 2):
        got = SlotSchedule(sel, s, layout, BLOCK_M, row0, skip)
        ref = reference(sel, s, layout, row0, skip)
        assert_same(got, ref, s, skip)
        assert torch.equal(got.pair_t, ref.pair_t)


@pytest.mark.parametrize(("rows", "nb"), [(2**20, 256), (2**19, 1024), (65537, 700), (3000, 10), (2000, 1000),
                                          (2**20 + 5, 256)])
def test_count_plan(rows, nb):
    """Row tiles of whole steps, at least max(MIN_BLOCK, 2 NB) rows, covering the rows with none empty; the
    count buffer at most half an int32 per (row, head)."""
    block, tiles = count_plan(rows, nb)
    assert block % slot_schedule.SUB == 0 and block >= max(slot_schedule.MIN_BLOCK, 2 * nb)
    assert (tiles - 1) * block < rows <= tiles * block
    assert 2 * nb * tiles <= rows


def test_tile_lists_follow_the_groups():
    """The shared tile rule against a loop over the groups: each slot's tiles walk its groups in order,
    ``block_m`` queries a tile, then point at the last group up to the bound."""
    g = torch.Generator().manual_seed(11)
    slots, heads, nb, rows, bm = 3, 2, 5, 90, 16
    cnt = torch.randint(0, 40, (slots * heads * nb,), generator=g, dtype=torch.int32)
    cnt[3] = 0
    first, bound, group, off = tile_lists(cnt, slots, rows, heads, nb, bm)
    assert bound == -(-rows * heads // bm) + heads * nb
    expected = [(gi, o) for gi in range(cnt.numel()) for o in range(0, int(cnt[gi]), bm)]
    per_slot = [sum(1 for gi, _ in expected if gi // (heads * nb) == s) for s in range(slots)]
    assert first.tolist() == [sum(per_slot[:s]) for s in range(slots + 1)]
    n = len(expected)
    assert list(zip(group[:n].tolist(), off[:n].tolist(), strict=True)) == expected
    assert group[n:].eq(cnt.numel() - 1).all() and group.dtype == off.dtype == torch.int32


def test_many_blocks_are_sorted():
    """Past 1024 blocks a program would walk more than MAX_BLOCK rows: the slot is sorted (as measured
    faster at the flashmoba preset's 4096 blocks), and the piece planner counts the sort's bytes."""
    assert count_plan(2**19, 1024) is not None and count_plan(2**19, 1025) is None
    assert count_plan(2**19, 4096) is None
    assert slot_schedule.schedule_bytes(1024) == slot_schedule.COUNTED_BYTES
    assert slot_schedule.schedule_bytes(4096) == slot_schedule.SORTED_BYTES
