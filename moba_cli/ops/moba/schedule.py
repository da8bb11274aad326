"""Work lists from the gate's choice ``block_idx [T, H, S]``, built on the device without a host sync:
the forward/dQ tiles (:class:`Schedule`, "gather and densify": every (slot, head, block) gets a dense list
of the queries that chose it), the dK/dV lists (:class:`BwdLists`), the long-block forward's lists
(:class:`PastLists`), the tiles over a schedule's groups (:func:`tile_lists`, also those of the lean
forward's one-slot schedules, :mod:`.slot_schedule`), and the kernels' reader of a tile (:func:`tile_queries`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def sorted_groups(key: torch.Tensor, block_idx: torch.Tensor, skip: torch.Tensor | None,
                   ngroups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of the ``(token, head, slot)`` pairs by their group ``key [T, H, S]``; pairs without a
    block (``block_idx < 0``) or whose token is in ``skip [T]`` are left out. Returns each sorted pair's
    token (int32, the kept pairs first) and the ``[ngroups + 1]`` group offsets."""
    valid = block_idx >= 0
    if skip is not None:
        valid &= ~skip[:, None, None]
    key = torch.where(valid, key, torch.full_like(key, ngroups)).reshape(-1)
    del valid
    # Radix sort time grows with the key's width: 16-bit keys take half the passes of 32-bit ones.
    if ngroups < 2**15 - 1:
        key = key.to(torch.int16)
    skey, perm = torch.sort(key, stable=True)
    del key
    # Group offsets from the sorted keys (bincount would sync to size its output).
    offs = torch.searchsorted(skey, torch.arange(ngroups + 1, device=skey.device, dtype=skey.dtype))
    del skey
    per_token = block_idx.shape[1] * block_idx.shape[2]
    return torch.div(perm, per_token, rounding_mode="floor").to(torch.int32), offs


def key_dtype(ngroups: int) -> torch.dtype:
    """Narrowest integer type for group keys below ``ngroups``."""
    return torch.int32 if ngroups < 2**31 - 1 else torch.int64


def tile_lists(group_cnt: torch.Tensor, slots: int, rows: int, heads: int, num_blocks: int,
               block_m: int) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """The forward/dQ tiles of groups in (slot, head, block) order with ``group_cnt [S*H*NB]`` queries each,
    ``rows`` tokens per slot: ``(slot_first [S+1], tiles_bound, tile_group, tile_off)`` as in
    :class:`Schedule` (int32, on the device, no host sync)."""
    dev = group_cnt.device
    ngroups = group_cnt.numel()
    ntiles = (group_cnt + block_m - 1) // block_m
    cum = torch.cumsum(ntiles, 0, dtype=torch.int32)
    # Any slot has at most rows*H queries, in at most min(H*NB, rows*H) non-empty groups, so at most this
    # many tiles.
    tiles_bound = triton.cdiv(rows * heads, block_m) + min(heads * num_blocks, rows * heads)
    slot_first = torch.zeros(slots + 1, device=dev, dtype=torch.int32)
    if ngroups:
        slot_first[1:] = cum.view(slots, heads * num_blocks)[:, -1]
    # int32 throughout: these temporaries are a share of the lean forward's per-slot peak (fwd_pieces.py)
    ti = torch.arange(slots * tiles_bound, device=dev, dtype=torch.int32)
    g = torch.searchsorted(cum, ti, right=True, out_int32=True).clamp_(max=max(ngroups - 1, 0))
    first_tile = cum.sub_(ntiles)
    del ntiles
    tile_off = ti.sub_(first_tile.index_select(0, g)).mul_(block_m)
    return slot_first, tiles_bound, g, tile_off


class BwdLists:
    """The dK/dV kernels' work lists, from ``block_idx [T, H, S]``: for each (head, block), group
    ``2 * (h * NB + j)`` holds the block's own queries and group ``2 * (h * NB + j) + 1``, right after it in
    ``pair_t``, the queries that chose it as a past block, each in token order. ``group_off``/``group_cnt``
    ``[2 * H * NB]``. One program then walks a block's queries as two runs (the first causal), where the
    forward's slot-major lists would split them into one run per slot, each ending in a partly empty tile
    and restarting the row-copy pipeline. ``skip [T]``: tokens left out (the dense prefix)."""

    def __init__(self, block_idx: torch.Tensor, num_blocks: int, skip: torch.Tensor | None = None):
        t_total, h, s = block_idx.shape
        ngroups = 2 * h * num_blocks
        dev = block_idx.device
        kdt = key_dtype(ngroups)
        head = torch.arange(h, device=dev, dtype=kdt)[None, :, None] * num_blocks
        past = (torch.arange(s, device=dev) > 0).to(kdt)[None, None, :]
        self.pair_t, offs = sorted_groups((block_idx.to(kdt) + head) * 2 + past, block_idx, skip, ngroups)
        self.group_off = offs[:-1].to(torch.int32)
        self.group_cnt = (offs[1:] - offs[:-1]).to(torch.int32)


class Schedule:
    """Work lists built from ``block_idx [T, H, S]``, on the device and without a host sync.

    ``pair_t``: token of every (token, head, slot) pair, the valid ones first, sorted by (slot, head, block)
    and, within a group, by token. ``group_off``/``group_cnt`` ``[S*H*NB]``: each group's range in
    ``pair_t``. ``tile_group``/``tile_off``: the forward/dQ tiles (``block_m`` queries each), ordered by
    slot; slot ``s``'s tiles are ``slot_first[s] .. slot_first[s+1]`` (device ``[S+1]``). The host does not
    know the tile counts: ``tiles_bound`` is an upper bound on any slot's count, used as the launch grid
    (programs past their slot's end exit at once), so building and using the schedule never waits for
    the GPU. ``block_idx`` is kept for the forward only (the last launch needs it). ``skip [T]`` (bool):
    tokens left out of every list (the dense prefix, :mod:`.dense_prefix`).
    """

    def __init__(self, block_idx: torch.Tensor, num_blocks: int, block_m: int, skip: torch.Tensor | None = None):
        t_total, h, s = block_idx.shape
        self.slots, self.heads, self.num_blocks, self.block_m = s, h, num_blocks, block_m
        self.block_idx: torch.Tensor | None = block_idx
        ngroups = s * h * num_blocks
        dev = block_idx.device
        # A group's key is its place in (slot, head, block) order; the slot/head part is a [H, S] table.
        kdt = key_dtype(ngroups)
        sh = torch.arange(s, device=dev, dtype=kdt)[None, :] * h + torch.arange(h, device=dev, dtype=kdt)[:, None]
        self.pair_t, offs = sorted_groups(block_idx.to(kdt) + sh[None] * num_blocks, block_idx, skip, ngroups)
        del sh
        self.group_off = offs[:-1].to(torch.int32)
        self.group_cnt = (offs[1:] - offs[:-1]).to(torch.int32)
        del offs
        self.slot_first, self.tiles_bound, self.tile_group, self.tile_off = tile_lists(
            self.group_cnt, s, t_total, h, num_blocks, block_m)


class PastLists:
    """The (query, head) pairs that chose each key block as a past block, from ``block_idx [T, H, S]``
    (slot 0 is the own block): sorted by (block, head), then token. ``group_off``/``group_cnt``
    ``[NB * H]``; ``rows[j]`` (host) = the most choosers any head has for block ``j``."""

    def __init__(self, block_idx: torch.Tensor, num_blocks: int):
        t, h, s = block_idx.shape
        past = block_idx[:, :, 1:]
        ngroups = num_blocks * h
        kdt = key_dtype(ngroups)
        key = past.to(kdt) * h + torch.arange(h, device=past.device, dtype=kdt)[None, :, None]
        self.pair_t, offs = sorted_groups(key, past, None, ngroups)
        cnt = offs[1:] - offs[:-1]
        self.group_off = offs[:-1].to(torch.int32)
        self.group_cnt = cnt.to(torch.int32)
        # One host sync: the calls' shapes. The forward is long here (large blocks), so it costs nothing.
        self.rows: list[int] = cnt.view(num_blocks, h).amax(1).tolist() if ngroups else []


@triton.jit
def tile_queries(PAIR_T, GROUP_OFF, GROUP_CNT, TILE_GROUP, TILE_OFF, BS, BE, tile, NB,
                  H: tl.constexpr, G: tl.constexpr, EVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A forward/dQ tile: its head, KV head, the key range ``[ks, kend)`` of its block that it needs, the end
    ``free`` of the key tiles that need no mask, and its gathered tokens ``t`` (valid where ``rvalid``)."""
    g = tl.load(TILE_GROUP + tile)
    off = tl.load(TILE_OFF + tile)
    j = g % NB
    h = (g // NB) % H
    cnt = tl.load(GROUP_CNT + g) - off
    base = tl.load(GROUP_OFF + g) + off
    ks = tl.load(BS + j)
    ke = tl.load(BE + j)
    rm = tl.arange(0, BLOCK_M)
    rvalid = rm < cnt
    # Rows past the tile's end point at the block's first key so they stay finite; they are not stored.
    t = tl.load(PAIR_T + base + rm, mask=rvalid, other=ks)
    kend = tl.minimum(ke, tl.max(t, 0) + 1)
    # Key tiles wholly before the tile's first query need no mask: every past block (complete, and a
    # multiple of BLOCK_N long when EVEN), and the own block up to the diagonal.
    if EVEN:
        tmin = tl.min(tl.where(rvalid, t, 2147483647), 0)
        free = ks + ((tl.minimum(tmin + 1, kend) - ks) // BLOCK_N) * BLOCK_N
    else:
        free = ks
    return h, h // G, ks, kend, free, t, rvalid
