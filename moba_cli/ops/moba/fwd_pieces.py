"""The lean inference forward (no gradient wanted, ``KernelOptions.fwd_lean``): the sparse forward with
less memory around it.

Nothing is kept for a backward, so the block lists are int16 where the block count allows, each slot's
schedule is built just before its launch and freed after it, and where even that would take more than
``KernelOptions.fwd_piece_budget`` of the output's bytes, the gate and the slots run for a share of the
heads (whole KV groups) and of the rows at a time. Per query the arithmetic is the same as
:func:`.fwd.forward`'s: the same blocks, merged in the same order.
"""

from __future__ import annotations

import torch

from .common import empty
from .fwd import SlotLauncher, stats_buffers, value_scales
from .gate import block_means, index_dtype, select_blocks
from .layout import BlockLayout, num_slots
from .options import KernelOptions
from .slot_schedule import SlotSchedule, schedule_bytes


def forward_pieces(t_total: int, hq: int, hkv: int, slots: int, index_bytes: int, out_bytes: int,
                   budget: float, min_rows: int, sched_bytes: int) -> tuple[int, int]:
    """``(heads, rows)`` of one piece: ``heads`` a multiple of the GQA group that divides ``hq``, ``rows`` at
    least ``min_rows`` (or all). A piece holds its block lists (``slots * index_bytes`` per row and head)
    and one slot's schedule (``sched_bytes`` per row and head, :func:`.slot_schedule.schedule_bytes`),
    within ``budget * out_bytes`` where it can. Heads are split first (halving), since a piece of whole
    heads keeps every block's choosers together."""
    g = hq // hkv
    if budget <= 0 or t_total == 0:
        return hq, max(t_total, 1)
    per_row_head = slots * index_bytes + sched_bytes
    limit = max(1, int(budget * out_bytes))
    heads = hq
    while heads > g and t_total * heads * per_row_head > limit:
        nxt = heads // 2
        if nxt % g or hq % nxt:
            break
        heads = nxt
    rows = t_total
    if t_total * heads * per_row_head > limit:
        pieces = -(-t_total * heads * per_row_head // limit)
        rows = max(min_rows, -(-t_total // pieces))
    return heads, min(rows, t_total)


def forward_in_pieces(q, k, v, layout: BlockLayout, topk: int, scale: float, skip: torch.Tensor | None,
                      block_m: int, out: torch.Tensor, opts: KernelOptions) -> torch.Tensor:
    """Gate, schedule and forward of every scheduled query into ``out`` ``[T, Hq, D]``, one slot's schedule
    at a time, piece by piece; ``skip [T]``: rows left out (the dense prefix). Returns the log-sum-exp
    ``[T, Hq]`` (float32, log2 units, as :func:`.fwd.forward`)."""
    t_total, hq, _ = q.shape
    hkv = k.shape[1]
    slots = num_slots(topk, layout.max_blocks)
    idt = index_dtype(layout.num_blocks)
    heads, rows = forward_pieces(t_total, hq, hkv, slots, torch.empty((), dtype=idt).element_size(),
                                 out.numel() * out.element_size(), opts.fwd_piece_budget, opts.fwd_piece_min_rows,
                                 schedule_bytes(layout.num_blocks))
    poison = opts.poison_outputs
    lse = empty(t_total, hq, dtype=torch.float32, device=q.device, poison=poison)
    stats = stats_buffers(lse, slots, poison)
    vscale = value_scales(v)
    g = hq // hkv
    order = [*range(1, slots), 0]
    for h0 in range(0, hq, heads):
        hs, kvs = slice(h0, h0 + heads), slice(h0 // g, (h0 + heads) // g)
        qh, kh, vh = q[:, hs], k[:, kvs], v[:, kvs]
        km = block_means(kh, layout, poison) if 1 < slots and topk < layout.max_blocks else None
        for r0 in range(0, t_total, rows):
            r = slice(r0, min(r0 + rows, t_total))
            sel = select_blocks(qh, kh, layout, topk, opts, r, km, idt)
            launch = SlotLauncher(qh, kh, vh, layout, scale, opts, out[:, hs], lse[:, hs],
                                  None if stats is None else (stats[0][:, hs], stats[1][:, hs]), vscale[kvs],
                                  sel, r0)
            piece_skip = None if skip is None else skip[r]
            for s in order:
                sched = SlotSchedule(sel, s, layout, block_m, r0, piece_skip)
                launch(sched, 0, first=s == order[0], last=s == 0)
                del sched
            del sel, launch
    return lse
