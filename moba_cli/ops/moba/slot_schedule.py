"""One slot's forward schedule for the lean inference forward (:mod:`.fwd_pieces`), built in 4 to 6 bytes
per (row, head) where :class:`~.schedule.Schedule`'s stable sort takes about 30.

The own-block slot 0 needs no sort: every query's block is its own, so a block's list is its token range.
A past-block slot is put in (head, block) order by a stable counting sort in Triton
(:func:`_slot_count_kernel`): programs over (row tile, head) count their pairs per block into a
``[H, NB, P]`` buffer (P row tiles), an exclusive cumsum over it gives each (head, block, tile) the start
of its run in ``pair_t``, and a second pass writes every pair there. Tiles and the pairs within them are
taken in token order, so the lists equal the sort's bit for bit. Nothing waits for the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import BlockLayout
from .schedule import Schedule, tile_lists

# Pairs ranked at once within a row tile ([SUB, SUB] comparisons), by 2 warps. With 2 warps Triton lays
# the table out one column (pair) per thread, so each pair's sum stays within its thread and each key is
# loaded once per step: about 245 instructions per step of 64 pairs for sm_90 (PTX; 4 warps split the
# rows and load every key 64 times: 467), against 140 per 32 pairs for one warp at SUB 32, which walks a
# tile in twice the steps, each waiting on its counters and two barriers. Not timed on a GPU.
SUB = 64
NUM_WARPS = 2
# Fewest rows in a row tile. A tile also has at least 2 * NB rows, so the count buffer holds at most half
# an int32 per (row, head).
MIN_BLOCK = 1024
# Most rows one program walks (32 steps, each waiting on its counters and two barriers). Past it (more
# than 1024 blocks) the slot is sorted: measured on an H100 (results/memory/pieces-*-h100-*.json), the
# counting sort kept the lean forward within 1.3% of the default at 32-256 blocks, but at the flashmoba
# preset's 4096 blocks (8192-row tiles, 128 steps) it was 4.9% slower, where the sort with head pieces had
# been 1.8% slower (H200, results/memory/pieces-flashmoba-512k-3e87528.json).
MAX_BLOCK = 2048
# Bytes per (row, head) of one slot's schedule at its peak. Counting sort: the int32 token list (4) beside
# the count buffer (at most half an int32, 2), freed before the tile lists are built; the own-block slot's
# list is 4 bytes per row for all heads. Stable sort: its int16 keys and their sorted copy, its int64
# indices and their sorted copy, the validity mask, the int32 token list. Not counted: buffers per (head,
# block) (8 to 16 bytes) and per tile (up to 12 while the tiles are built, 8 after; a tile per ``block_m``
# pairs or non-empty group), small where blocks are long.
COUNTED_BYTES = 6
SORTED_BYTES = 30


@triton.jit
def _slot_keys(SEL, SKIP, r0, end, i, stride_t, HAS_SKIP: tl.constexpr):
    """Blocks of rows ``r0 + i`` (``i [SUB]``) in ``SEL`` (one head's column, row stride ``stride_t``); -1
    where there is none, the row is skipped or at ``end`` or past it."""
    # Rows past the end read the last row instead (and are dropped below): unmasked loads, and the per-row
    # offsets ``i * stride_t`` are the same every step.
    off = tl.minimum(i * stride_t, (end - 1 - r0) * stride_t)
    key = tl.load(SEL + tl.cast(r0, tl.int64) * stride_t + off).to(tl.int32)
    ok = (i < end - r0) & (key >= 0)
    if HAS_SKIP:
        ok = ok & (tl.load(SKIP + r0 + tl.minimum(i, end - 1 - r0)) == 0)
    return tl.where(ok, key, -1)


# All sizes and strides at run time: one compiled variant per (dtype, pass) serves every shape.
@triton.jit(do_not_specialize=["rows", "row0", "block", "NB", "P", "stride_t", "stride_h"])
def _slot_count_kernel(SEL, SKIP, CNT, PAIR_T, rows, row0, block, NB, P, stride_t, stride_h,
                       HAS_SKIP: tl.constexpr, SCATTER: tl.constexpr, SUB: tl.constexpr):
    """Rows ``p * block ..`` of head ``h`` (program ``(p, h)``) of one slot ``SEL [rows, H]``, walked in
    steps of ``SUB`` rows. Counts: ``CNT [1 + H*NB*P]`` (int32), entry ``1 + (h*NB + j)*P + p`` this tile's
    pairs of block ``j``. ``SCATTER``: the second pass, where entry ``(h*NB + j)*P + p`` (after the cumsum:
    where the tile's run of block ``j`` starts in ``PAIR_T``) is the running position, and each pair's
    token ``row0 + row`` is written there. Every program owns its own entries, so no atomics are needed."""
    p = tl.program_id(0)
    h = tl.program_id(1)
    start = p * block
    end = tl.minimum(start + block, rows)
    i = tl.arange(0, SUB)
    # Over a [SUB, SUB] table of pairs (row: the other pair, column: the pair itself), one sum gives each
    # pair the step's pairs of its block (high half) and those before it (low half): 2^16 + 1 for an
    # earlier row, 2^16 otherwise. Summed over axis 0, which Triton's default layout keeps within a thread.
    weight = tl.where(i[:, None] < i[None, :], 65537, 65536)
    cnt = CNT + h * NB * P + p
    if not SCATTER:
        cnt += 1
    SEL += h * stride_h
    key = _slot_keys(SEL, SKIP, start, end, i, stride_t, HAS_SKIP)
    for r0 in range(start, end, SUB):
        # The next step's blocks are loaded now, so their latency hides behind this step's counters.
        nxt = _slot_keys(SEL, SKIP, r0 + SUB, end, i, stride_t, HAS_SKIP)
        ok = key >= 0
        both = tl.sum(tl.where(key[:, None] == key[None, :], weight, 0), 0)
        ptr = cnt + key * P
        cur = tl.load(ptr, mask=ok, other=0)
        if SCATTER:
            # pairs of one block keep their rows' order: a stable sort
            tl.store(PAIR_T + cur + (both & 65535), row0 + r0 + i, mask=ok)
        # Pairs of one block load the same counter and store the same new value; the barriers keep every
        # load of this step before any store, and the stores before the next step's loads.
        tl.debug_barrier()
        tl.store(ptr, cur + (both >> 16), mask=ok)
        tl.debug_barrier()
        key = nxt


def counts_blocks(num_blocks: int) -> bool:
    """Whether past-block slots over ``num_blocks`` blocks take the counting sort (:data:`MAX_BLOCK`)."""
    return 0 < num_blocks and 2 * num_blocks <= MAX_BLOCK


def schedule_bytes(num_blocks: int) -> int:
    """Peak bytes per (row, head) of one slot's schedule over ``num_blocks`` blocks (pieces of at least
    ``2 * num_blocks`` rows)."""
    return COUNTED_BYTES if counts_blocks(num_blocks) else SORTED_BYTES


def count_plan(rows: int, num_blocks: int) -> tuple[int, int] | None:
    """``(block, tiles)``: rows per row tile (a multiple of :data:`SUB`, at least ``max(MIN_BLOCK, 2*NB)``)
    and how many tiles cover ``rows``; None where the slot is sorted instead: more blocks than
    :func:`counts_blocks` allows, or a count buffer ``[H, NB, tiles]`` of more than half an int32 per (row,
    head): fewer than ``2 * NB`` rows (a small piece of a batch of many blocks)."""
    if rows == 0 or not counts_blocks(num_blocks) or rows < 2 * num_blocks:
        return None
    least = max(MIN_BLOCK, 2 * num_blocks)
    tiles = max(1, rows // least)
    block = triton.cdiv(triton.cdiv(rows, tiles), SUB) * SUB
    return block, triton.cdiv(rows, block)


class SlotSchedule:
    """The schedule of slot ``slot`` alone of the block lists ``sel [rows, H, S]`` of tokens ``row0 ..
    row0 + rows``, with :class:`~.schedule.Schedule`'s attributes as the forward reads them (``slots == 1``,
    ``block_idx`` None). ``pair_t`` holds absolute tokens; ``skip [rows]`` (bool): rows left out (the dense
    prefix, which leaves out whole blocks).

    Slot 0 (the own block): ``pair_t`` is the rows themselves (``[rows]``), and each head's group of block
    ``j`` is the block's range within them, so the heads' groups share one range. Past-block slots: the
    counting sort, ``pair_t [rows*H]``, equal to the sort's (its tail past the listed pairs is not
    written); a piece of fewer than ``2 * NB`` rows (:func:`count_plan`) is sorted by
    :class:`~.schedule.Schedule` instead.
    """

    def __init__(self, sel: torch.Tensor, slot: int, layout: BlockLayout, block_m: int, row0: int = 0,
                 skip: torch.Tensor | None = None):
        rows, h, _ = sel.shape
        nb = layout.num_blocks
        self.slots, self.heads, self.num_blocks, self.block_m = 1, h, nb, block_m
        self.block_idx: torch.Tensor | None = None
        plan = None if slot == 0 else count_plan(rows, nb)
        if slot == 0:
            self.pair_t, self.group_off, self.group_cnt = own_block_lists(layout, rows, h, row0, skip)
        elif plan is None:
            sched = Schedule(sel[:, :, slot:slot + 1], nb, block_m, skip)
            self.pair_t, self.group_off, self.group_cnt = sched.pair_t, sched.group_off, sched.group_cnt
            if row0:
                self.pair_t += row0
            del sched
        else:
            self.pair_t, self.group_off, self.group_cnt = counted_lists(sel[:, :, slot], nb, row0, skip, *plan)
        self.slot_first, self.tiles_bound, self.tile_group, self.tile_off = tile_lists(
            self.group_cnt, 1, rows, h, nb, block_m)


def own_block_lists(layout: BlockLayout, rows: int, heads: int, row0: int,
                    skip: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slot 0's ``(pair_t [rows], group_off [H*NB], group_cnt [H*NB])``: block ``j``'s group is its token
    range clipped to the rows, empty where ``skip`` (whole blocks) leaves it out."""
    dev = layout.block_start.device
    pair_t = torch.arange(row0, row0 + rows, device=dev, dtype=torch.int32)
    lo = (layout.block_start - row0).clamp_(0, rows)
    cnt = (layout.block_end - row0).clamp_(0, rows).sub_(lo)
    if skip is not None and rows:
        # a block's rows are all skipped or none: its first row in the piece tells
        cnt.masked_fill_(skip.index_select(0, lo.clamp(max=rows - 1)), 0)
    return pair_t, lo.repeat(heads), cnt.repeat(heads)


def counted_lists(sel: torch.Tensor, num_blocks: int, row0: int, skip: torch.Tensor | None, block: int,
                  tiles: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A past-block slot's ``(pair_t [rows*H], group_off [H*NB], group_cnt [H*NB])`` by the counting sort
    over row tiles of ``block`` rows; ``sel [rows, H]`` (one slot, any strides)."""
    rows, h = sel.shape
    dev = sel.device
    ngroups = h * num_blocks
    # Entry 0 stays 0, so the inclusive cumsum in place leaves at entry i the pairs before (head, block,
    # tile) number i: the exclusive cumsum, without a second buffer.
    cnt = torch.zeros(1 + ngroups * tiles, device=dev, dtype=torch.int32)
    pair_t = torch.empty(rows * h, device=dev, dtype=torch.int32)
    skip_u8 = sel if skip is None else skip.view(torch.uint8)
    args = (sel, skip_u8, cnt, pair_t, rows, row0, block, num_blocks, tiles, sel.stride(0), sel.stride(1))
    kw = dict(HAS_SKIP=skip is not None, SUB=SUB, num_warps=NUM_WARPS)
    _slot_count_kernel[(tiles, h)](*args, SCATTER=False, **kw)
    cnt.cumsum_(0)
    group_off = cnt[0:ngroups * tiles:tiles].clone()
    group_cnt = cnt[tiles::tiles] - group_off
    _slot_count_kernel[(tiles, h)](*args, SCATTER=True, **kw)
    return pair_t, group_off, group_cnt
