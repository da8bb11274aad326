"""Triton kernels for MoBA prefill (forward and backward) and the autograd Function around them.

Pipeline, all on the packed layout (q ``[T, Hq, D]``, k/v ``[T, Hkv, D]``, see :mod:`.layout`):

1. ``_block_mean_kernel``: float32 mean key of every block, ``[NB, Hkv, D]``.
2. Gate: each (query, head) scores its sequence's complete past blocks and keeps the best ``topk - 1``
   with a streaming top-k, so the ``[T, NB]`` score matrix is never written. ``_gate_kernel`` merges a
   sorted candidate list tile by tile; ``_gate_grouped_kernel`` (many blocks, few to keep) tracks only the
   best groups of 16 blocks. Output ``block_idx [T, Hq, slots]`` as in :mod:`.naive`.
3. Schedule (torch): the (query, head, slot) pairs are sorted by (slot, head, block), so every key block
   gets a dense list of the queries that chose it ("gather and densify").
4. ``_fwd_kernel``: one program per tile of up to ``BLOCK_M`` gathered queries of one (slot, head,
   block): dense attention of the gathered queries over that block's keys with an online softmax, then a
   log-sum-exp merge into a float32 accumulator. Slots run as separate launches, and each query has
   at most one block per slot, so merges never race and need no atomics. The own-block slot, which
   every query has, runs last and writes the normalised output.
5. Backward: ``_bwd_dkdv_kernel`` owns one key tile of one block and loops over every query (of every
   head in its KV group) that chose the block, so dK/dV stay in registers and K/V are never copied per
   query head; the queries come from :class:`BwdLists` (per head and block: its own queries, then the
   ones that chose it as a past block, two runs instead of one per slot). By default it also adds each
   query's dQ share with float32 atomics. Without that (``MOBA_BWD_FUSED=0``), ``_bwd_dq_kernel`` walks
   the forward's tiles and merges dQ slot by slot, deterministically. On Hopper with bf16 or fp16 and
   head dim 128 the same work runs in the Gluon kernel of :mod:`.gluon_bwd` (``MOBA_BWD_GLUON=0``: this
   one), which orders its asynchronous products and row copies by hand.

With a dense prefix (:mod:`.dense_prefix`: the first ``topk`` blocks of equal-length sequences, where
every past block is kept), those queries are left out of steps 3-5 and run through cuDNN instead. With
long blocks (:mod:`.cudnn_blocks`) the whole forward (steps 3-4) is dense cuDNN calls, one per key block,
and the backward stays here.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from moba_cli.errors import MobaError

from . import cudnn_blocks, dense_prefix
from .knobs import env_flag, env_str
from .layout import BlockLayout, num_slots
from .triton_keys import pack_keys

LOG2E = 1.4426950408889634
MAX_GATE_CANDIDATES = 128
# Gates: "grouped" (group maxima; the kept groups' scores in scratch memory) or "sort" (a sorted
# candidate list merged every tile). Grouped is faster with many blocks and few past blocks to keep;
# measured on the H200 (results/kernel-dev/v6-gate-probe.jsonl.log, v5-gate-probe.json): 4096 blocks,
# 7 kept: 69.6 vs 144.6 ms; 2048 blocks, 7 kept: 5.4 vs 9.3 ms; but 256 blocks, 7 kept: 2.3 vs 1.4 ms,
# and 15 kept at 1024 blocks (v5): 10.8 vs 5.0 ms.
# GATE_KIND (or MOBA_GATE_KIND) forces one (tests, probes); the grouped kernel takes up to 16.
GROUPED_GATE_MAX = 16
GROUPED_GATE_DEFAULT_MAX = 8
GROUPED_GATE_MIN_BLOCKS = 1024
GATE_KIND: str | None = None


# Tests set this to fill every buffer the kernels write with NaN (floats) or -7 (ints) first, so an
# element a kernel forgets to write shows up instead of passing with stale memory.
POISON_OUTPUTS = False


def _is_interp() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _empty(*shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if not POISON_OUTPUTS:
        return torch.empty(*shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -7
    return torch.full(shape, fill, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------
# Block means and gate


@triton.jit
def _block_mean_kernel(
    K, BS, BE, KM,
    stride_kt, stride_kh, stride_mn, stride_mh,
    D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    j = tl.program_id(0)
    hk = tl.program_id(1)
    bs = tl.load(BS + j)
    be = tl.load(BE + j)
    d = tl.arange(0, D)
    acc = tl.zeros([BLOCK_T, D], dtype=tl.float32)
    for t0 in range(bs, be, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        kt = tl.load(
            K + t.to(tl.int64)[:, None] * stride_kt + hk * stride_kh + d[None, :],
            mask=(t < be)[:, None], other=0.0,
        )
        acc += kt.to(tl.float32)
    mean = tl.sum(acc, 0) / (be - bs).to(tl.float32)
    tl.store(KM + j.to(tl.int64) * stride_mn + hk * stride_mh + d, mean)


@triton.jit
def _gate_rows(Q, TB, FB, T, rt, h, stride_qt, stride_qh,
               G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT: tl.constexpr):
    """Rows ``rt * BLOCK_M ..`` of head ``h`` for a gate: KV head, row ids and mask, each row's own block
    ``tb`` and its sequence's first block ``fb``, the queries ``[BLOCK_M, D]`` (float32 unless ``SPLIT``),
    and the block range ``[lo, hi)`` to scan."""
    rows = rt * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    tb = tl.load(TB + rows, mask=rmask, other=0)
    fb = tl.load(FB + rows, mask=rmask, other=0)
    d = tl.arange(0, D)
    q = tl.load(
        Q + rows.to(tl.int64)[:, None] * stride_qt + h * stride_qh + d[None, :], mask=rmask[:, None], other=0.0
    )
    if not SPLIT:
        q = q.to(tl.float32)
    lo = tl.min(tl.where(rmask, fb, 2147483647), 0)
    hi = tl.max(tl.where(rmask, tb, 0), 0)
    return h // G, rows, rmask, tb, fb, d, q, lo, hi


@triton.jit
def _gate_scores(q, KM, KMH, KML, jj, hk, d, hi, stride_mn, stride_mh, PREC: tl.constexpr, SPLIT: tl.constexpr):
    """Scores ``[BLOCK_M, BLOCK_N]`` of the rows' queries against the mean keys of blocks ``jj`` (< hi)."""
    moff = jj.to(tl.int64)[:, None] * stride_mn + hk * stride_mh + d[None, :]
    mmask = (jj < hi)[:, None]
    if SPLIT:
        # bf16 q times the float32 mean as two bf16 products (mean = hi + lo, split once on the host): close
        # to a float32 dot (about 16 mantissa bits of the mean) at bf16 tensor-core speed.
        km_hi = tl.load(KMH + moff, mask=mmask, other=0.0)
        km_lo = tl.load(KML + moff, mask=mmask, other=0.0)
        s = tl.dot(q, tl.trans(km_hi)) + tl.dot(q, tl.trans(km_lo))
    else:
        km = tl.load(KM + moff, mask=mmask, other=0.0)
        s = tl.dot(q, tl.trans(km), input_precision=PREC)
    return s


# Run-time sizes and offsets are not specialised on (divisibility by 16, == 1): one compiled
# variant serves every shape (applies to each kernel with do_not_specialize) instead of up to three.
@triton.jit(do_not_specialize=["T"])
def _gate_kernel(
    Q, KM, KMH, KML, TB, FB, OUT, T,
    stride_qt, stride_qh, stride_mn, stride_mh, stride_ot, stride_oh,
    G: tl.constexpr, NPAST: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    h = tl.program_id(1)
    hk, rows, rmask, tb, fb, d, q, lo, hi = _gate_rows(
        Q, TB, FB, T, tl.program_id(0), h, stride_qt, stride_qh, G, D, BLOCK_M, SPLIT
    )
    # Candidates are int64 keys (triton_keys.pack_keys), so one integer sort ranks by score and, among
    # equal scores, puts the earlier block first (the tie rule). Empty entries get the high word -2^31+1,
    # below the key of any real (non-NaN) float, -inf included.
    neg = tl.full([BLOCK_M, BLOCK_N], -2147483647, tl.int32).to(tl.int64) << 32
    best = neg
    for j0 in range(lo, hi, BLOCK_N):
        jj = j0 + tl.arange(0, BLOCK_N)
        s = _gate_scores(q, KM, KMH, KML, jj, hk, d, hi, stride_mn, stride_mh, PREC, SPLIT)
        valid = (jj[None, :] >= fb[:, None]) & (jj[None, :] < tb[:, None])
        key = tl.where(valid, pack_keys(s, jj[None, :]), neg)
        key = tl.sort(key, dim=1)
        # Half-cleaner of a bitonic merge: with best descending and key ascending, the elementwise max
        # is exactly the BLOCK_N largest of the union; one more sort restores the order.
        best = tl.sort(tl.maximum(best, key), dim=1, descending=True)
    _gate_store(best, OUT, rows, rmask, tb, h, stride_ot, stride_oh, NPAST, BLOCK_N)


@triton.jit
def _gate_store(best, OUT, rows, rmask, tb, h, stride_ot, stride_oh, NPAST: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write a row's own block, then the blocks of its first ``NPAST`` keys in ``best`` (sorted, best
    first; -1 for empty keys)."""
    cols = tl.arange(0, BLOCK_N)
    high = (best >> 32).to(tl.int32)
    blk = 2147483647 - (best & 0xFFFFFFFF).to(tl.int32)
    blk = tl.where(high > -2147483647, blk, -1)
    optr = OUT + rows.to(tl.int64)[:, None] * stride_ot + h * stride_oh
    tl.store(optr + 1 + cols[None, :], blk, mask=rmask[:, None] & (cols[None, :] < NPAST))
    tl.store(optr, tb[:, None], mask=rmask[:, None])


@triton.jit(do_not_specialize=["T", "NTILES"])
def _gate_grouped_kernel(
    Q, KM, KMH, KML, TB, FB, OUT, SCR, T, NTILES,
    stride_qt, stride_qh, stride_mn, stride_mh, stride_ot, stride_oh,
    H: tl.constexpr, G: tl.constexpr, NPAST: tl.constexpr, NG: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    """Top-``NPAST`` past blocks per (query, head) without a sort per tile.

    Each tile of ``BLOCK_N`` blocks is a group. The best ``NPAST`` blocks lie in the ``NPAST`` groups with
    the best group maxima (a block outside them would be beaten by ``NPAST`` group maxima), so the scan
    only tracks the ``NG >= NPAST`` best groups per row: one max per tile, one min over the kept groups,
    and a replace of the worst one. A replacing group's scores go to this program's scratch rows in
    ``SCR`` (``[BLOCK_M, NG, BLOCK_N]`` float32, in L2), so nothing score-sized is carried through the
    loop. At the end the kept groups are merged with two small sorts each. Keys as in ``_gate_kernel``.

    Persistent: program ``p`` takes the (row tile, head) tiles ``p, p + nprog, ...`` so its scratch is
    reused, and the strided pick spreads short (early) and long (late) rows evenly.
    """
    pid = tl.program_id(0)
    scr = SCR + pid.to(tl.int64) * (BLOCK_M * NG * BLOCK_N)
    rl = tl.arange(0, BLOCK_M)
    gi = tl.arange(0, NG)
    lane = tl.arange(0, BLOCK_N)
    nrow = tl.full([BLOCK_M], -2147483647, tl.int32).to(tl.int64) << 32
    neg = tl.full([BLOCK_M, BLOCK_N], -2147483647, tl.int32).to(tl.int64) << 32
    for tile in range(pid, NTILES, tl.num_programs(0)):
        h = tile % H
        hk, rows, rmask, tb, fb, d, q, lo, hi = _gate_rows(
            Q, TB, FB, T, tile // H, h, stride_qt, stride_qh, G, D, BLOCK_M, SPLIT
        )
        # A group with no valid block gets the empty high word with low word 0; the kept groups start as
        # distinct empty keys 1..NG above that, so such a group never displaces anything and the min over
        # the kept keys is unique (one slot replaced per row).
        gkey = (tl.full([BLOCK_M, NG], -2147483647, tl.int32).to(tl.int64) << 32) | (gi + 1)[None, :].to(tl.int64)
        gbase = tl.zeros([BLOCK_M, NG], dtype=tl.int32)
        for j0 in range(lo, hi, BLOCK_N):
            jj = j0 + lane
            s = _gate_scores(q, KM, KMH, KML, jj, hk, d, hi, stride_mn, stride_mh, PREC, SPLIT)
            valid = (jj[None, :] >= fb[:, None]) & (jj[None, :] < tb[:, None])
            # The group's best block from float32 max/argmax (first index on ties: the earlier block),
            # packed into a key per row only; a row's valid blocks are the range [fb, tb).
            sv = tl.where(valid, s, float("-inf"))
            gm, ga = tl.max(sv, axis=1, return_indices=True, return_indices_tie_break_left=True)
            gmax = tl.where((tb > j0) & (fb < j0 + BLOCK_N), pack_keys(gm, j0 + ga), nrow)
            kmin, kslot = tl.min(gkey, axis=1, return_indices=True)
            better = gmax > kmin
            upd = (gi[None, :] == kslot[:, None]) & better[:, None]
            gkey = tl.where(upd, gmax[:, None], gkey)
            gbase = tl.where(upd, j0, gbase)
            # Each score element is stored by the same thread every time (fixed layout), so stores to a
            # slot land in program order.
            tl.store(scr + (rl[:, None] * NG + kslot[:, None]) * BLOCK_N + lane[None, :], s, mask=better[:, None])
        # Make every thread's scratch stores visible to the whole program (bar.sync orders global memory
        # within a block).
        tl.debug_barrier()
        best = neg
        for g in tl.static_range(NG):
            sel = gi[None, :] == g
            base = tl.sum(tl.where(sel, gbase, 0), 1)
            kept = tl.max(tl.where(sel, (gkey >> 32).to(tl.int32), -2147483647), 1) > -2147483647
            blk = base[:, None] + lane[None, :]
            ok = kept[:, None] & (blk >= fb[:, None]) & (blk < tb[:, None])
            sc = tl.load(scr + (rl[:, None] * NG + g) * BLOCK_N + lane[None, :], mask=ok, other=0.0)
            key = tl.sort(tl.where(ok, pack_keys(sc, blk), neg), dim=1)
            best = tl.sort(tl.maximum(best, key), dim=1, descending=True)
        _gate_store(best, OUT, rows, rmask, tb, h, stride_ot, stride_oh, NPAST, BLOCK_N)
        # The next tile's scratch stores must not overtake this tile's reads.
        tl.debug_barrier()


def block_means(k: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Float32 mean key of every block. k ``[T, Hkv, D]`` -> ``[NB, Hkv, D]``."""
    nb, hkv, d = layout.num_blocks, k.shape[1], k.shape[2]
    km = _empty(nb, hkv, d, dtype=torch.float32, device=k.device)
    if nb:
        _block_mean_kernel[(nb, hkv)](
            k, layout.block_start, layout.block_end, km,
            k.stride(0), k.stride(1), km.stride(0), km.stride(1),
            D=d, BLOCK_T=16 if _is_interp() else 64,
        )
    return km


def _all_past_blocks(layout: BlockLayout, hq: int, slots: int, rows: slice = slice(None)) -> torch.Tensor:
    """Selection when top-k covers every block: own block, then every past block in order."""
    tb, fb = layout.token_block[rows], layout.token_first_block[rows]
    past = fb[:, None] + torch.arange(slots - 1, device=tb.device, dtype=torch.int32)[None, :]
    past = torch.where(past < tb[:, None], past, torch.full_like(past, -1))
    sel = torch.cat([tb[:, None], past], dim=1)
    return sel[:, None, :].expand(-1, hq, -1).contiguous()


def index_dtype(num_blocks: int) -> torch.dtype:
    """The narrowest integer type for block indices (and -1) of ``num_blocks`` blocks."""
    return torch.int16 if num_blocks < 2**15 else torch.int32


def gate_kind(npast: int, max_blocks: int) -> str:
    """``"grouped"`` or ``"sort"`` for ``npast`` past blocks to keep among up to ``max_blocks`` blocks per
    sequence (forced by ``GATE_KIND`` / ``MOBA_GATE_KIND``, where the grouped kernel can take ``npast``)."""
    kind = GATE_KIND or _env_gate_kind()
    if kind is None:
        many = max_blocks >= GROUPED_GATE_MIN_BLOCKS
        kind = "grouped" if npast <= GROUPED_GATE_DEFAULT_MAX and many else "sort"
    return "sort" if npast > GROUPED_GATE_MAX else kind


def select_blocks(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout, topk: int, rows: slice = slice(None),
                  km: torch.Tensor | None = None, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """The gate on the GPU: q ``[T, Hq, D]``, k ``[T, Hkv, D]`` -> ``block_idx [T, Hq, slots]`` int32.

    ``rows``: only the queries ``q[rows]`` (a contiguous range; ``[len, Hq, slots]`` then). ``km``: the
    block means of ``k`` (:func:`block_means`) when the caller already has them. ``dtype``: int16 halves
    the lists where every block index fits (:func:`index_dtype`)."""
    q = q[rows]
    tb, fb = layout.token_block[rows], layout.token_first_block[rows]
    t_total, hq, d = q.shape
    slots = num_slots(topk, layout.max_blocks)
    if slots == 1:
        return tb[:, None, None].expand(-1, hq, 1).to(dtype)
    if topk >= layout.max_blocks:
        return _all_past_blocks(layout, hq, slots, rows).to(dtype)
    npast = slots - 1
    if npast > MAX_GATE_CANDIDATES:
        raise MobaError(
            f"the triton backend supports topk up to {MAX_GATE_CANDIDATES + 1} unless topk covers every "
            f"block (got topk={topk} with up to {layout.max_blocks} blocks per sequence)"
        )
    km = block_means(k, layout) if km is None else km
    out = _empty(t_total, hq, slots, dtype=dtype, device=q.device)
    exact = q.dtype == torch.float32 or _is_interp()
    split = q.dtype == torch.bfloat16 and not _is_interp()
    kind = gate_kind(npast, layout.max_blocks)
    common = dict(G=hq // k.shape[1], NPAST=npast, D=d, PREC="ieee" if exact else "tf32x3", SPLIT=split)
    cfg = _env_config("MOBA_GATE_CFG", (3, 4, 5))
    # The bf16 halves of the float32 means are made once here, not in every program's loop.
    km_hi = km.to(q.dtype) if split else km
    km_lo = (km - km_hi.float()).to(q.dtype) if split else km
    args = (q, km, km_hi, km_lo, tb, fb, out)
    strides = (q.stride(0), q.stride(1), km.stride(0), km.stride(1), out.stride(0), out.stride(1))
    if kind == "grouped":
        ng = max(2, triton.next_power_of_2(npast))
        block_m, block_n, num_warps, num_stages = (16 if _is_interp() else (64 if ng <= 8 else 32)), 16, 4, 3
        per_sm = None
        if cfg:
            block_m, block_n, num_warps = cfg[0], max(cfg[1], triton.next_power_of_2(npast)), cfg[2]
            num_stages = cfg[3] if len(cfg) > 3 else num_stages
            per_sm = cfg[4] if len(cfg) > 4 else None
        ntiles = triton.cdiv(t_total, block_m) * hq
        kw = dict(H=hq, NG=ng, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **common)
        # (km stands in for the scratch pointer while the kernel is compiled to size the launch)
        progs = _persistent_programs(_gate_grouped_kernel, q.device, ntiles, per_sm, (
            *args, km, t_total, ntiles, *strides), kw)
        scratch = torch.empty(progs * block_m * ng * block_n, dtype=torch.float32, device=q.device)
        _gate_grouped_kernel[(progs,)](*args, scratch, t_total, ntiles, *strides, **kw)
        return out
    block_n = max(16, triton.next_power_of_2(npast))
    block_m = 16 if _is_interp() else (64 if block_n <= 32 else 32)
    num_warps = 4
    if cfg:
        block_m, block_n, num_warps = cfg[0], max(block_n, cfg[1]), cfg[2]
    _gate_kernel[(triton.cdiv(t_total, block_m), hq)](
        *args, t_total, *strides, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, **common,
    )
    return out


_RESIDENT: dict = {}


def _persistent_programs(kernel, device: torch.device, ntiles: int, per_sm: int | None, args: tuple,
                         kw: dict) -> int:
    """Programs for a persistent launch: as many as the GPU holds at once (from the compiled kernel's
    registers and shared memory), at most ``ntiles``. More would run as a second, partly empty wave."""
    if _is_interp():
        return max(1, min(ntiles, 3))  # a few, so the tests exercise the strided tile loop
    if per_sm is None:
        # dtypes too: the same constexprs compile differently for fp16 and float32 inputs
        dtypes = tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
        key = (device.index, kernel.fn.__name__, dtypes, tuple(sorted((k, str(v)) for k, v in kw.items())))
        per_sm = _RESIDENT.get(key)
        if per_sm is None:
            compiled = kernel.warmup(*args, grid=(1,), **kw)
            compiled._init_handles()
            props = triton.runtime.driver.active.utils.get_device_properties(device.index)
            threads = 32 * kw["num_warps"]
            by_regs = props["max_num_regs"] // max(1, ((compiled.n_regs + 7) // 8 * 8) * threads)
            by_smem = props["max_shared_mem"] // max(1, compiled.metadata.shared)
            per_sm = _RESIDENT[key] = max(1, min(by_regs, by_smem, 2048 // threads, 32))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(ntiles, sms * per_sm))


# --------------------------------------------------------------------------------------------------
# Schedule: gather the queries of each (slot, head, block)


def _sorted_groups(key: torch.Tensor, block_idx: torch.Tensor, skip: torch.Tensor | None,
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


def _key_dtype(ngroups: int) -> torch.dtype:
    return torch.int32 if ngroups < 2**31 - 1 else torch.int64


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
        kdt = _key_dtype(ngroups)
        head = torch.arange(h, device=dev, dtype=kdt)[None, :, None] * num_blocks
        past = (torch.arange(s, device=dev) > 0).to(kdt)[None, None, :]
        self.pair_t, offs = _sorted_groups((block_idx.to(kdt) + head) * 2 + past, block_idx, skip, ngroups)
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
        kdt = _key_dtype(ngroups)
        sh = torch.arange(s, device=dev, dtype=kdt)[None, :] * h + torch.arange(h, device=dev, dtype=kdt)[:, None]
        self.pair_t, offs = _sorted_groups(block_idx.to(kdt) + sh[None] * num_blocks, block_idx, skip, ngroups)
        del sh
        counts = offs[1:] - offs[:-1]
        self.group_off = offs[:-1].to(torch.int32)
        self.group_cnt = counts.to(torch.int32)
        ntiles = (counts + block_m - 1) // block_m
        cum = torch.cumsum(ntiles, 0)
        # Any slot has at most T*H queries, in at most min(H*NB, T*H) non-empty groups, so at most this many
        # tiles.
        self.tiles_bound = triton.cdiv(t_total * h, block_m) + min(h * num_blocks, t_total * h)
        self.slot_first = torch.zeros(s + 1, device=dev, dtype=torch.int32)
        if ngroups:
            self.slot_first[1:] = cum.view(s, h * num_blocks)[:, -1].to(torch.int32)
        ti = torch.arange(s * self.tiles_bound, device=dev, dtype=cum.dtype)
        g = torch.searchsorted(cum, ti, right=True).clamp_(max=max(ngroups - 1, 0))
        first_tile = cum - ntiles
        self.tile_group = g.to(torch.int32)
        self.tile_off = ((ti - first_tile[g]) * block_m).to(torch.int32)


# --------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _tile_queries(PAIR_T, GROUP_OFF, GROUP_CNT, TILE_GROUP, TILE_OFF, BS, BE, tile, NB,
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


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, t, K, V, KD, VD, hk, lo, hi, kend, qk_scale,
               stride_kt, stride_kh, stride_vt, stride_vh,
               D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, MASK: tl.constexpr,
               DESC: tl.constexpr):
    """Online-softmax attention of gathered queries ``q [BLOCK_M, D]`` over keys ``lo .. hi``.

    ``DESC``: unmasked tiles come through the TMA descriptors ``KD``/``VD`` (k, v viewed ``[T, Hkv*D]``).
    """
    d = tl.arange(0, D)
    for n0 in range(lo, hi, BLOCK_N):
        kn = n0 + tl.arange(0, BLOCK_N)
        kn64 = kn.to(tl.int64)
        kptr = K + kn64[None, :] * stride_kt + hk * stride_kh + d[:, None]
        vptr = V + kn64[:, None] * stride_vt + hk * stride_vh + d[None, :]
        if MASK:
            kmask = kn < kend
            kt = tl.load(kptr, mask=kmask[None, :], other=0.0)
            s = tl.dot(q, kt, input_precision=PREC)
            s = tl.where(kmask[None, :] & (kn[None, :] <= t[:, None]), s, float("-inf"))
        elif DESC:
            s = tl.dot(q, tl.trans(KD.load([n0, hk * D])), input_precision=PREC)
        else:
            s = tl.dot(q, tl.load(kptr), input_precision=PREC)
        # The scale is applied to the row max and inside one fused multiply-add per score, not by a
        # separate multiply of the whole tile (the softmax's elementwise work is what limits this loop).
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK:
            vt = tl.load(vptr, mask=kmask[:, None], other=0.0)
        elif DESC:
            vt = VD.load([n0, hk * D])
        else:
            vt = tl.load(vptr)
        acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["slot", "NB"])
def _fwd_kernel(
    Q, K, V, KD, VD, PART, VSCALE, M, L, OUT, LSE, SEL,
    PAIR_T, GROUP_OFF, GROUP_CNT, TILE_GROUP, TILE_OFF, SLOT_FIRST, BS, BE,
    slot, qk_scale, row0,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_mt, stride_mh,
    stride_ot, stride_oh, stride_st, stride_sh,
    H: tl.constexpr, NB, G: tl.constexpr, D: tl.constexpr,
    FIRST: tl.constexpr, LAST: tl.constexpr, EVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, DESC: tl.constexpr, PREFETCH: tl.constexpr,
):
    """One tile of slot ``slot``. ``FIRST``: the first launch, which stores the tile's partial result,
    normalised, into ``PART`` (the output's own memory, viewed as float16 for bf16/fp16 outputs, scaled by
    ``VSCALE [Hkv]``, a power of two that keeps it inside float16's range) and its softmax statistics into
    ``M``/``L``; later launches merge into it. ``LAST`` (slot 0, the own block, launched last): merges,
    normalises and writes ``OUT`` and ``LSE``. A query takes part in the past-block slots only if its slot
    1 is a block (``SEL [rows, H, S]``, rows counted from ``row0``): the gates fill slots best first, so a
    query with any past block has slot 1."""
    tile = tl.load(SLOT_FIRST + slot) + tl.program_id(0)
    if tile < tl.load(SLOT_FIRST + slot + 1):
        h, hk, ks, kend, free, t, rvalid = _tile_queries(
            PAIR_T, GROUP_OFF, GROUP_CNT, TILE_GROUP, TILE_OFF, BS, BE, tile, NB, H, G, EVEN, BLOCK_M, BLOCK_N,
        )
        t64 = t.to(tl.int64)
        d = tl.arange(0, D)
        if PREFETCH and not FIRST:
            # The merge at the end reads this tile's partial results, and with one program per SM nothing
            # else would run while it waits: ask L2 for those lines now, so the read overlaps the attention
            # (one bulk prefetch per row; padding rows point at a real row).
            tl.inline_asm_elementwise(
                f"cp.async.bulk.prefetch.L2.global [$1], {D * 2};", "=r,l", [PART + t64 * stride_ot + h * stride_oh],
                dtype=tl.int32, is_pure=False, pack=1,
            )
        q = tl.load(Q + t64[:, None] * stride_qt + h * stride_qh + d[None, :], mask=rvalid[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, t, K, V, KD, VD, hk, ks, free, kend, qk_scale,
                                   stride_kt, stride_kh, stride_vt, stride_vh, D, BLOCK_N, PREC, False, DESC)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, t, K, V, KD, VD, hk, free, kend, kend, qk_scale,
                                   stride_kt, stride_kh, stride_vt, stride_vh, D, BLOCK_N, PREC, True, False)
        pptr = PART + t64[:, None] * stride_ot + h * stride_oh + d[None, :]
        mptr = t64 * stride_mt + h * stride_mh
        vscale = tl.load(VSCALE + hk)
        if FIRST and not LAST:
            tl.store(pptr, (acc * (vscale / l_i)[:, None]).to(PART.dtype.element_ty), mask=rvalid[:, None])
            tl.store(M + mptr, m_i, mask=rvalid)
            tl.store(L + mptr, l_i, mask=rvalid)
        else:
            if FIRST:
                mm = m_i
                ll = l_i
            else:
                ld = rvalid
                if LAST:
                    srow = (t64 - row0) * stride_st + h * stride_sh
                    ld = ld & (tl.load(SEL + srow + 1, mask=rvalid, other=-1) >= 0)
                o0 = tl.load(pptr, mask=ld[:, None], other=0.0).to(tl.float32)
                m0 = tl.load(M + mptr, mask=ld, other=float("-inf"))
                l0 = tl.load(L + mptr, mask=ld, other=0.0)
                mm = tl.maximum(m0, m_i)
                a0 = tl.math.exp2(m0 - mm) * l0
                a1 = tl.math.exp2(m_i - mm)
                acc = o0 * (a0 / vscale)[:, None] + acc * a1[:, None]
                ll = a0 + l_i * a1
            if LAST:
                optr = OUT + t64[:, None] * stride_ot + h * stride_oh + d[None, :]
                tl.store(optr, (acc / ll[:, None]).to(OUT.dtype.element_ty), mask=rvalid[:, None])
                tl.store(LSE + mptr, mm + tl.math.log2(ll), mask=rvalid)
            else:
                tl.store(pptr, (acc * (vscale / ll)[:, None]).to(PART.dtype.element_ty), mask=rvalid[:, None])
                tl.store(M + mptr, mm, mask=rvalid)
                tl.store(L + mptr, ll, mask=rvalid)


# --------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _delta_kernel(
    OUT, DO, DELTA, T, stride_ot, stride_oh, stride_dt, stride_dh,
    H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    d = tl.arange(0, D)
    o = tl.load(OUT + r64[:, None] * stride_ot + h * stride_oh + d[None, :], mask=rmask[:, None], other=0.0)
    do = tl.load(DO + r64[:, None] * stride_dt + h * stride_dh + d[None, :], mask=rmask[:, None], other=0.0)
    tl.store(DELTA + r64 * H + h, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rmask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, t, rvalid, K, V, hk, lo, hi, kend, qk_scale,
              stride_kt, stride_kh, stride_vt, stride_vh,
              D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, MASK: tl.constexpr):
    d = tl.arange(0, D)
    for n0 in range(lo, hi, BLOCK_N):
        kn = n0 + tl.arange(0, BLOCK_N)
        kn64 = kn.to(tl.int64)
        kptr = K + kn64[:, None] * stride_kt + hk * stride_kh + d[None, :]
        vptr = V + kn64[:, None] * stride_vt + hk * stride_vh + d[None, :]
        if MASK:
            kmask = kn < kend
            kb = tl.load(kptr, mask=kmask[:, None], other=0.0)
            vb = tl.load(vptr, mask=kmask[:, None], other=0.0)
        else:
            kb = tl.load(kptr)
            vb = tl.load(vptr)
        s = tl.dot(q, tl.trans(kb), input_precision=PREC) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASK:
            p = tl.where(rvalid[:, None] & kmask[None, :] & (kn[None, :] <= t[:, None]), p, 0.0)
        dp = tl.dot(do, tl.trans(vb), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kb.dtype), kb, input_precision=PREC)
    return dq


@triton.jit(do_not_specialize=["slot", "NB"])
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    PAIR_T, GROUP_OFF, GROUP_CNT, TILE_GROUP, TILE_OFF, SLOT_FIRST, BS, BE,
    slot, qk_scale, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    H: tl.constexpr, NB, G: tl.constexpr, D: tl.constexpr,
    FIRST: tl.constexpr, EVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    tile = tl.load(SLOT_FIRST + slot) + tl.program_id(0)
    if tile < tl.load(SLOT_FIRST + slot + 1):
        h, hk, ks, kend, free, t, rvalid = _tile_queries(
            PAIR_T, GROUP_OFF, GROUP_CNT, TILE_GROUP, TILE_OFF, BS, BE, tile, NB, H, G, EVEN, BLOCK_M, BLOCK_N,
        )
        t64 = t.to(tl.int64)
        d = tl.arange(0, D)
        q = tl.load(Q + t64[:, None] * stride_qt + h * stride_qh + d[None, :], mask=rvalid[:, None], other=0.0)
        do = tl.load(DO + t64[:, None] * stride_dot + h * stride_doh + d[None, :], mask=rvalid[:, None], other=0.0)
        lse = tl.load(LSE + t64 * H + h, mask=rvalid, other=0.0)
        delta = tl.load(DELTA + t64 * H + h, mask=rvalid, other=0.0)
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        dq = _dq_inner(dq, q, do, lse, delta, t, rvalid, K, V, hk, ks, free, kend, qk_scale,
                       stride_kt, stride_kh, stride_vt, stride_vh, D, BLOCK_N, PREC, False)
        dq = _dq_inner(dq, q, do, lse, delta, t, rvalid, K, V, hk, free, kend, kend, qk_scale,
                       stride_kt, stride_kh, stride_vt, stride_vh, D, BLOCK_N, PREC, True)
        dq = dq * sm_scale
        ptr = DQ + t64[:, None] * stride_dqt + h * stride_dqh + d[None, :]
        if FIRST:
            tl.store(ptr, dq, mask=rvalid[:, None])
        else:
            tl.store(ptr, tl.load(ptr, mask=rvalid[:, None], other=0.0) + dq, mask=rvalid[:, None])


@triton.jit
def _dkdv_inner(dk, dv, kb, vb, kn, kmask, Q, DO, LSE, DELTA, DQ, PAIR_T, base, m_start, cnt, h, qk_scale, sm_scale,
                stride_qt, stride_qh, stride_dot, stride_doh, stride_dqt, stride_dqh,
                H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr, MASK: tl.constexpr,
                FUSED_DQ: tl.constexpr):
    """Accumulate one key tile's dK/dV over the gathered queries ``PAIR_T[base + m_start .. base + cnt]``;
    with ``FUSED_DQ`` also add this tile's share of their dQ into the float32 ``DQ`` (atomics).

    Without MASK, rows past ``cnt`` load as zeros (q, dO, lse, delta): their P is 1 but dP, delta, dO and
    q are 0, so they add exactly nothing.
    """
    d = tl.arange(0, D)
    # The next tile's query indices are loaded one tile ahead. Loaded in the iteration that uses them,
    # they make Q and dO rows an indirect load, which Triton issues at the end of the previous iteration
    # and waits for at the top of this one, with nothing in between (paper 1M backward: 191 vs 195 ms).
    rm_n = m_start + tl.arange(0, BLOCK_M)
    t_n = tl.load(PAIR_T + base + rm_n, mask=rm_n < cnt, other=0)
    for m0 in range(m_start, cnt, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        rvalid = rm < cnt
        t = t_n
        rm_n = rm + BLOCK_M
        t_n = tl.load(PAIR_T + base + rm_n, mask=rm_n < cnt, other=0)
        t64 = t.to(tl.int64)
        q = tl.load(Q + t64[:, None] * stride_qt + h * stride_qh + d[None, :], mask=rvalid[:, None], other=0.0)
        do = tl.load(DO + t64[:, None] * stride_dot + h * stride_doh + d[None, :], mask=rvalid[:, None], other=0.0)
        lse = tl.load(LSE + t64 * H + h, mask=rvalid, other=0.0)
        delta = tl.load(DELTA + t64 * H + h, mask=rvalid, other=0.0)
        st = tl.dot(kb, tl.trans(q), input_precision=PREC) * qk_scale
        pt = tl.math.exp2(st - lse[None, :])
        if MASK:
            pt = tl.where(kmask[:, None] & rvalid[None, :] & (kn[:, None] <= t[None, :]), pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        dpt = tl.dot(vb, tl.trans(do), input_precision=PREC)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk += tl.dot(dst, q, input_precision=PREC)
        if FUSED_DQ:
            # One dS product more here instead of a separate dQ pass that recomputes QK^T and dO V^T
            # (5 products per tile pair instead of 7); each query's dQ gets one add per key tile it saw.
            # dQ^T = K^T dS^T: dS^T is already in registers as the dK product's operand and goes to shared
            # memory as is (dS K would need it transposed), and M is the head dim, so the product is two
            # full-height Hopper MMAs at any query tile (H200, paper 1M backward: 195 vs 210 ms).
            dqt = tl.dot(tl.trans(kb), dst, input_precision=PREC) * sm_scale
            tl.atomic_add(DQ + t64[None, :] * stride_dqt + h * stride_dqh + d[:, None], dqt, mask=rvalid[None, :],
                          sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["NB", "NSUB"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ,
    PAIR_T, GROUP_OFF, GROUP_CNT, BS, BE,
    qk_scale, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh,
    H: tl.constexpr, NB, NSUB, G: tl.constexpr, D: tl.constexpr,
    EVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, FUSED_DQ: tl.constexpr,
):
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    j = pid // NSUB
    ks_blk = tl.load(BS + j)
    ke = tl.load(BE + j)
    ks = ks_blk + (pid % NSUB) * BLOCK_N
    if ks < ke:
        kn = ks + tl.arange(0, BLOCK_N)
        kmask = kn < ke
        kn64 = kn.to(tl.int64)
        d = tl.arange(0, D)
        kb = tl.load(K + kn64[:, None] * stride_kt + hk * stride_kh + d[None, :], mask=kmask[:, None], other=0.0)
        vb = tl.load(V + kn64[:, None] * stride_vt + hk * stride_vh + d[None, :], mask=kmask[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        for hh in range(G):
            h = hk * G + hh
            # The block's own queries (BwdLists), in token order: those before this key tile see none of it
            # (causality), so start at the first query tile that can, and mask. Right after them in the
            # list: every query that chose the block as a past block, all of whose keys it sees.
            g = (h * NB + j) * 2
            off = tl.load(GROUP_OFF + g)
            n_own = tl.load(GROUP_CNT + g)
            dk, dv = _dkdv_inner(
                dk, dv, kb, vb, kn, kmask, Q, DO, LSE, DELTA, DQ, PAIR_T, off,
                ((ks - ks_blk) // BLOCK_M) * BLOCK_M, n_own, h, qk_scale, sm_scale,
                stride_qt, stride_qh, stride_dot, stride_doh, stride_dqt, stride_dqh, H, D, BLOCK_M, PREC, True,
                FUSED_DQ,
            )
            dk, dv = _dkdv_inner(
                dk, dv, kb, vb, kn, kmask, Q, DO, LSE, DELTA, DQ, PAIR_T, off + n_own,
                0, tl.load(GROUP_CNT + g + 1), h, qk_scale, sm_scale,
                stride_qt, stride_qh, stride_dot, stride_doh, stride_dqt, stride_dqh, H, D, BLOCK_M, PREC,
                not EVEN, FUSED_DQ,
            )
        dk = dk * sm_scale
        tl.store(
            DK + kn64[:, None] * stride_dkt + hk * stride_dkh + d[None, :], dk.to(DK.dtype.element_ty),
            mask=kmask[:, None],
        )
        tl.store(
            DV + kn64[:, None] * stride_dvt + hk * stride_dvh + d[None, :], dv.to(DV.dtype.element_ty),
            mask=kmask[:, None],
        )


# --------------------------------------------------------------------------------------------------
# Launch configuration


def _env_config(name: str, sizes: tuple[int, ...] = (4,)) -> list[int] | None:
    """Kernel-tuning override, e.g. ``MOBA_FWD_CFG=128,64,8,3`` (used by scripts/perf_probe.py): positive
    integers, as many as one of ``sizes``."""
    val = os.environ.get(name)
    if not val:
        return None
    try:
        cfg = [int(x) for x in val.split(",")]
    except ValueError:
        cfg = []
    if len(cfg) not in sizes or min(cfg) < 1:
        raise MobaError(f"{name} must be {' or '.join(map(str, sizes))} positive integers separated by commas, "
                        f"got {val!r}")
    return cfg


def _env_gate_kind() -> str | None:
    kind = env_str("MOBA_GATE_KIND")
    if kind not in (None, "grouped", "sort"):
        raise MobaError(f"MOBA_GATE_KIND must be 'grouped' or 'sort', got {kind!r}")
    return kind


def _fwd_config(d: int, dtype: torch.dtype, chunk: int) -> dict:
    cfg = _env_config("MOBA_FWD_CFG")
    if cfg:
        return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), cfg, strict=True))
    if _is_interp():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    # Small blocks are chosen by fewer queries each: shorter query tiles waste less on padding
    # (H200 sweep, docs/perf-notes.md: chunk 128 -> 64-row tiles 55 ms vs 70 ms at 512K x 16 heads).
    if d <= 64 or chunk <= 512:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    # 128-key tiles with 3 stages (and TMA, below): paper 1M attention 54.1 vs 57.9 ms for 64-key tiles
    # (results/kernel-dev/v6-fwd-sweep.json; with 2 stages they were no faster, v5).
    return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}


def _bwd_config(d: int, dtype: torch.dtype, fused: bool) -> dict:
    cfg = _env_config("MOBA_BWD_CFG")
    if cfg:
        return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), cfg, strict=True))
    if _is_interp():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    if fused:
        # H200 (results/kernel-dev/v6-bwd-probe*.json): 128-key tiles over 8 warps carry dK, dV and the dQ
        # share; 64-key tiles on 4 warps spill and run at half the speed. Two stages beat one at both
        # presets (paper 1M 209 vs 237 ms; flashmoba 512K 62 vs 66 ms).
        return {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


# Backward: dQ from atomic adds in the dK/dV kernel ("fused", 5 products per tile pair; the float32 sums
# are not bit-reproducible run to run) or from its own slot-wise pass (7 products, deterministic).
# None: the default below; MOBA_BWD_FUSED=0/1 overrides (tests set the flag).
BWD_FUSED: bool | None = None
BWD_FUSED_DEFAULT = True


# Backward on Hopper: the Gluon kernel (gluon_bwd.py: hand-ordered asynchronous MMAs and row copies) for
# bf16 or fp16 with head dim 128, else the Triton kernel below (H200, paper 1M: 159 vs 192 ms; 128K x 8 heads
# 135 vs 158 ms; results/kernel-dev/v8-bwd-gluon.json). None: the default; MOBA_BWD_GLUON=0/1 overrides.
BWD_GLUON: bool | None = None
BWD_GLUON_DEFAULT = True


@functools.cache
def _gluon_available() -> bool:
    """Gluon's Hopper API as gluon_bwd.py uses it: Triton 3.6 (the version it was written and measured
    with; Gluon is experimental and its API changed between releases)."""
    try:
        major, minor = (int(x) for x in triton.__version__.split(".")[:2])
        if (major, minor) < (3, 6):
            return False
        from . import gluon_bwd  # noqa: F401
    except (ImportError, AttributeError, ValueError):
        return False
    return True


def _gluon_bwd_usable(q: torch.Tensor) -> bool:
    # bf16 and fp16: both run in the GPU suite against the Triton kernel and the float32 reference.
    if _is_interp() or not q.is_cuda or not _hopper(q.device) or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    return q.shape[-1] == 128 and _gluon_available()


def bwd_gluon(q: torch.Tensor) -> bool:
    """Whether the backward of ``q``'s call runs the Gluon kernel: where it applies (Hopper, bf16, head
    dim 128, Triton >= 3.6), unless ``BWD_GLUON`` or ``MOBA_BWD_GLUON=0`` turns it off."""
    want = BWD_GLUON if BWD_GLUON is not None else env_flag("MOBA_BWD_GLUON")
    return (BWD_GLUON_DEFAULT if want is None else want) and _gluon_bwd_usable(q)


def bwd_fused() -> bool:
    if BWD_FUSED is not None:
        return BWD_FUSED
    env = env_flag("MOBA_BWD_FUSED")
    return BWD_FUSED_DEFAULT if env is None else env


def check_env_knobs() -> None:
    """Raise MobaError for a kernel-tuning environment variable with a bad value, before any work starts
    (the kernels read them at each call, deep inside a run; commands call this first)."""
    for name in ("MOBA_FWD_CFG", "MOBA_BWD_CFG"):
        _env_config(name)
    _env_config("MOBA_GATE_CFG", (3, 4, 5))
    _env_gate_kind()
    for name in ("MOBA_FWD_DESC", "MOBA_BWD_FUSED", "MOBA_BWD_GLUON", "MOBA_DENSE_PREFIX", "MOBA_CUDNN_BLOCKS"):
        env_flag(name)
    cudnn_blocks.env_splits()


def _prec(dtype: torch.dtype) -> str:
    # float32 inputs are meant for exact checks: keep full float32 products instead of TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


# TMA (Hopper's bulk tensor copy) for the forward's unmasked K/V tiles. None: decided by the device
# (capability 9.x) and the tile shape; tests and probes force it. MOBA_FWD_DESC=0/1 overrides.
FWD_DESC: bool | None = None


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, cfg: dict):
    """Host TMA descriptors over k, v ``[T, Hkv, D]`` viewed ``[T, Hkv*D]``, or ``(None, None)`` where
    they do not apply (not Hopper, strides that are not a plain row-major ``[T, Hkv*D]``, misalignment).

    By default only for the 128-row, 8-warp tiles (large chunks): H200, paper preset at 1M, attention
    61.3 -> 59.0 ms; the 64-row, 4-warp tiles of small chunks were slower with it (57 -> 85 ms).
    """
    env = env_flag("MOBA_FWD_DESC")
    if FWD_DESC is not None:
        want = FWD_DESC
    elif env is not None:
        want = env
    else:
        want = _hopper(k.device) and cfg["BLOCK_M"] >= 128 and cfg["num_warps"] >= 8
    block_n = cfg["BLOCK_N"]
    if not want:
        return None, None
    t, hkv, d = k.shape
    esz = k.element_size()
    for x in (k, v):
        if x.stride(2) != 1 or x.stride(1) != d or x.data_ptr() % 16 or (x.stride(0) * esz) % 16 or t == 0:
            return None, None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return tuple(
        TensorDescriptor(x, shape=[t, hkv * d], strides=[x.stride(0), 1], block_shape=[block_n, d]) for x in (k, v)
    )


# Forward: prefetch each merging tile's float32 partial results into L2 at the tile's start (PTX
# prefetch; not under the interpreter).
FWD_PREFETCH = True


def _hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def _partial_view(out: torch.Tensor) -> torch.Tensor:
    """Where the forward keeps each query's partial result between slots: the output's own memory, as
    float16 for 16-bit outputs (11 significant bits against bfloat16's 8, so the merges of up to 128 slots
    stay within the final rounding's error) and as itself for float32. No second ``[T, H, D]`` buffer."""
    return out.view(torch.float16) if out.element_size() == 2 else out


def value_scales(v: torch.Tensor) -> torch.Tensor:
    """Per KV head, a power of two that maps ``max |v|`` to about 2^14: a normalised partial result is a
    convex combination of value rows, so scaled by this it fits float16 (max 65504) and keeps its
    relative precision away from float16's subnormals. v ``[T, Hkv, D]`` -> float32 ``[Hkv]`` (on the
    device, no host sync). Exactly 1 for float32 values, whose partials are stored unscaled."""
    if v.dtype == torch.float32 or v.shape[0] == 0:
        return torch.ones(v.shape[1], dtype=torch.float32, device=v.device)
    # max and -min separately: v.abs() would copy all of v first
    amax = torch.maximum(v.amax(dim=(0, 2)).float(), -v.amin(dim=(0, 2)).float())
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax)), torch.zeros_like(amax))
    return torch.exp2(14.0 - e)


def _forward(q, k, v, layout: BlockLayout, sched: Schedule, scale: float, out: torch.Tensor | None = None):
    """Launch the attention slots: the past-block slots first (slot 1 stores, later ones merge), then the
    own-block slot 0, which every query has, merges and writes the output (into ``out`` if given) and its
    log-sum-exp. Partial results live in ``out`` itself (:func:`_partial_view`) with float32 softmax
    statistics ``[T, H]`` beside them."""
    t_total, hq, d = q.shape
    if out is None:
        out = _empty(*q.shape, dtype=q.dtype, device=q.device)
    lse = _empty(t_total, hq, dtype=torch.float32, device=q.device)
    if sched.tiles_bound == 0:
        return out, lse
    stats = _stats(t_total, hq, sched.slots, q.device)
    sel = sched.block_idx
    if sel is None:
        raise RuntimeError("this schedule's block_idx was released after its forward")
    launch = _SlotLauncher(q, k, v, layout, scale, out, lse, stats, value_scales(v), sel, 0)
    for s in [*range(1, sched.slots), 0]:
        launch(sched, s, first=s == min(1, sched.slots - 1), last=s == 0)
    return out, lse


def _stats(rows: int, heads: int, slots: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The float32 running max and sum ``[rows, heads]`` between slots (None with one slot)."""
    if slots < 2:
        return None
    return (_empty(rows, heads, dtype=torch.float32, device=device),
            _empty(rows, heads, dtype=torch.float32, device=device))


class _SlotLauncher:
    """Launches :func:`_fwd_kernel` for one slot of a schedule. ``sel``: the block lists of the rows from
    ``row0`` on (the schedule's tokens are absolute); ``stats``: the running max/sum (None: one slot)."""

    def __init__(self, q, k, v, layout: BlockLayout, scale: float, out: torch.Tensor, lse: torch.Tensor,
                 stats, vscale: torch.Tensor, sel: torch.Tensor, row0: int):
        self.q, self.k, self.v, self.layout, self.scale = q, k, v, layout, scale
        self.out, self.lse, self.vscale, self.sel, self.row0 = out, lse, vscale, sel, row0
        self.m, self.l_ = stats if stats is not None else (lse, lse)  # one slot: the only launch is last
        self.part = _partial_view(out)
        self.cfg = _fwd_config(q.shape[-1], q.dtype, layout.chunk_size)
        kd, vd = _kv_descriptors(k, v, self.cfg)
        self.use_desc = kd is not None
        self.kd, self.vd = (kd, vd) if self.use_desc else (k, v)

    def __call__(self, sched: Schedule, slot: int, first: bool, last: bool) -> None:
        q, k, v, out, cfg, sel, m = self.q, self.k, self.v, self.out, self.cfg, self.sel, self.m
        if sched.tiles_bound == 0:
            return
        _fwd_kernel[(sched.tiles_bound,)](
            q, k, v, self.kd, self.vd, self.part, self.vscale, m, self.l_, out, self.lse, sel,
            sched.pair_t, sched.group_off, sched.group_cnt, sched.tile_group, sched.tile_off, sched.slot_first,
            self.layout.block_start, self.layout.block_end,
            slot, self.scale * LOG2E, self.row0,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), m.stride(0), m.stride(1),
            out.stride(0), out.stride(1), sel.stride(0), sel.stride(1),
            H=q.shape[1], NB=self.layout.num_blocks, G=q.shape[1] // k.shape[1], D=q.shape[-1], FIRST=first,
            LAST=last, EVEN=self.layout.chunk_size % cfg["BLOCK_N"] == 0,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PREC=_prec(q.dtype), DESC=self.use_desc,
            PREFETCH=FWD_PREFETCH and not _is_interp(),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )


def _backward(q, k, v, out, dout, lse, layout: BlockLayout, lists: BwdLists, sched: Schedule | None, scale: float,
              fused: bool):
    """dQ, dK, dV. ``lists``: the dK/dV kernels' query lists; ``sched``: the dQ pass's tiles (not fused)."""
    t_total, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    cfg = _bwd_config(d, q.dtype, fused)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    delta = _empty(t_total, hq, dtype=torch.float32, device=q.device)
    bm = 16 if _is_interp() else 64
    _delta_kernel[(triton.cdiv(t_total, bm), hq)](
        out, dout, delta, t_total, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        H=hq, D=d, BLOCK_M=bm,
    )
    if not fused and (sched is None or sched.block_m != cfg["BLOCK_M"]):
        raise RuntimeError("the dQ pass needs a schedule of the backward's tile size")
    # Fused: dQ gathers atomic adds from the dK/dV kernel, so it starts at zero.
    dq_acc = (torch.zeros if fused else _empty)(t_total, hq, d, dtype=torch.float32, device=q.device)
    for s in range(0 if fused or sched is None or not sched.tiles_bound else sched.slots):
        _bwd_dq_kernel[(sched.tiles_bound,)](
            q, k, v, dout, lse, delta, dq_acc,
            sched.pair_t, sched.group_off, sched.group_cnt, sched.tile_group, sched.tile_off, sched.slot_first,
            layout.block_start, layout.block_end,
            s, scale * LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq_acc.stride(0), dq_acc.stride(1),
            H=hq, NB=layout.num_blocks, G=g, D=d, FIRST=(s == 0), EVEN=layout.chunk_size % cfg["BLOCK_N"] == 0,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PREC=_prec(q.dtype),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    dk = _empty(*k.shape, dtype=k.dtype, device=k.device)
    dv = _empty(*v.shape, dtype=v.dtype, device=v.device)
    nsub = triton.cdiv(layout.chunk_size, cfg["BLOCK_N"])
    if layout.num_blocks and fused and bwd_gluon(q):
        from . import gluon_bwd

        gluon_bwd.launch(q, k, v, dout, lse, delta, dk, dv, dq_acc, lists, layout, scale, LOG2E)
    elif layout.num_blocks:
        _bwd_dkdv_kernel[(layout.num_blocks * nsub, hkv)](
            q, k, v, dout, lse, delta, dk, dv, dq_acc,
            lists.pair_t, lists.group_off, lists.group_cnt, layout.block_start, layout.block_end,
            scale * LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            dq_acc.stride(0), dq_acc.stride(1),
            H=hq, NB=layout.num_blocks, NSUB=nsub, G=g, D=d,
            EVEN=layout.chunk_size % cfg["BLOCK_N"] == 0,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PREC=_prec(q.dtype), FUSED_DQ=fused,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return dq_acc.to(q.dtype), dk, dv


# The dense prefix's cuDNN forward runs on a second stream beside the sparse launches, filling the SMs
# that each slot's last wave leaves idle (H200, paper 128K x 8 heads: docs/perf-notes.md v9).
PREFIX_STREAM = True
_SIDE_STREAMS: dict = {}


def _forward_with_prefix(q, k, v, out: torch.Tensor, prefix: dense_prefix.Prefix, scale: float, need_lse: bool,
                         sparse) -> tuple[torch.Tensor, tuple]:
    """``sparse(out) -> lse`` for the scheduled queries and :func:`.dense_prefix.forward` for the prefix
    rows, both into ``out``. Returns ``(lse, prefix_state)``."""
    if not (PREFIX_STREAM and q.is_cuda):
        lse = sparse(out)
        return lse, dense_prefix.forward(q, k, v, out, prefix, scale, need_lse)
    main = torch.cuda.current_stream(q.device)
    side = _SIDE_STREAMS.get(q.device.index)
    if side is None:
        side = _SIDE_STREAMS[q.device.index] = torch.cuda.Stream(q.device)
    side.wait_stream(main)  # inputs written and ``out`` allocated (and poisoned) on the main stream
    with torch.cuda.stream(side):
        state = dense_prefix.forward(q, k, v, out, prefix, scale, need_lse)
    lse = sparse(out)
    main.wait_stream(side)
    for x in state:
        if isinstance(x, torch.Tensor):
            # made on the side stream, used and freed on the main one: the allocator must not hand the
            # memory back to the side stream while main-stream work on it may still be queued
            x.record_stream(main)
    return lse, state


# Inference forward (no gradient wanted): nothing is kept for a backward, so the block lists are int16
# where the block count allows, each slot's schedule is built just before its launch and freed after it,
# and where even that would take more than this fraction of the output's bytes, the gate and the slots
# run for a share of the heads (whole KV groups) and rows at a time. 0: no pieces (still per-slot).
FWD_PIECE_BUDGET = 0.12
# Bytes per (row, head) of one slot's schedule at its peak (the stable sort: int16 keys and their copy,
# int64 indices and their copy, the validity mask), measured around 26.
SLOT_SCHEDULE_BYTES = 30
# Rows of a piece, at least: fewer would leave more forward tiles (BLOCK_M queries of one block) part
# empty, as each block's choosers are split among the pieces.
MIN_PIECE_ROWS = 65536


def forward_pieces(t_total: int, hq: int, hkv: int, slots: int, index_bytes: int, out_bytes: int,
                   budget: float | None = None) -> tuple[int, int]:
    """``(heads, rows)`` of one piece of the inference forward: ``heads`` a multiple of the GQA group that
    divides ``hq``, ``rows`` at least :data:`MIN_PIECE_ROWS` (or all). A piece holds its block lists
    (``slots * index_bytes`` per row and head) and one slot's schedule. Heads are split first (halving),
    since a piece of whole heads keeps every block's choosers together."""
    budget = FWD_PIECE_BUDGET if budget is None else budget
    g = hq // hkv
    if budget <= 0 or t_total == 0:
        return hq, max(t_total, 1)
    per_row_head = slots * index_bytes + SLOT_SCHEDULE_BYTES
    limit = budget * out_bytes
    heads = hq
    while heads > g and t_total * heads * per_row_head > limit:
        nxt = heads // 2
        if nxt % g or hq % nxt:
            break
        heads = nxt
    rows = t_total
    if t_total * heads * per_row_head > limit:
        pieces = -(-t_total * heads * per_row_head // max(1, int(limit)))
        rows = max(MIN_PIECE_ROWS, -(-t_total // pieces))
    return heads, min(rows, t_total)


def _forward_in_pieces(q, k, v, layout: BlockLayout, topk: int, scale: float, skip: torch.Tensor | None,
                       block_m: int, out: torch.Tensor) -> torch.Tensor:
    """Gate, schedule and forward of every scheduled query into ``out``, one slot's schedule at a time and
    piece by piece (:func:`forward_pieces`); returns the log-sum-exp ``[T, H]``. Per query the same
    arithmetic as :func:`_forward`: its slots merge in the same order."""
    t_total, hq, d = q.shape
    hkv = k.shape[1]
    slots = num_slots(topk, layout.max_blocks)
    idt = index_dtype(layout.num_blocks)
    heads, rows = forward_pieces(t_total, hq, hkv, slots, torch.empty((), dtype=idt).element_size(),
                                 out.numel() * out.element_size())
    lse = _empty(t_total, hq, dtype=torch.float32, device=q.device)
    stats = _stats(t_total, hq, slots, q.device)
    vscale = value_scales(v)
    g = hq // hkv
    order = [*range(1, slots), 0]
    for h0 in range(0, hq, heads):
        hs, ks_ = slice(h0, h0 + heads), slice(h0 // g, (h0 + heads) // g)
        qh, kh, vh = q[:, hs], k[:, ks_], v[:, ks_]
        km = block_means(kh, layout) if 1 < slots and topk < layout.max_blocks else None
        for r0 in range(0, t_total, rows):
            r = slice(r0, min(r0 + rows, t_total))
            sel = select_blocks(qh, kh, layout, topk, r, km, idt)
            launch = _SlotLauncher(qh, kh, vh, layout, scale, out[:, hs], lse[:, hs],
                                   None if stats is None else (stats[0][:, hs], stats[1][:, hs]),
                                   vscale[ks_], sel, r0)
            piece_skip = None if skip is None else skip[r]
            for s in order:
                sched = Schedule(sel[:, :, s:s + 1], layout.num_blocks, block_m, piece_skip)
                sched.block_idx = None
                if r0:
                    sched.pair_t += r0
                launch(sched, 0, first=s == order[0], last=s == 0)
                del sched
            del sel, launch
    return lse


class MobaFunction(torch.autograd.Function):
    """Autograd wrapper: forward runs the gate and the sparse attention; backward reuses the schedule."""

    @staticmethod
    def forward(ctx, q, k, v, layout: BlockLayout, topk: int, scale: float, prefix: dense_prefix.Prefix | None,
                blocks: cudnn_blocks.Plan | None = None):
        need_grad = any(ctx.needs_input_grad[:3])
        # Without a backward the sparse forward chooses blocks piece by piece (_forward_in_pieces).
        block_idx = select_blocks(q, k, layout, topk) if need_grad or blocks is not None else None
        bm_f = _fwd_config(q.shape[-1], q.dtype, layout.chunk_size)["BLOCK_M"]
        # The backward path is decided once here, so the schedule kept for it always fits.
        fused = bwd_fused()
        bm_b = _bwd_config(q.shape[-1], q.dtype, fused)["BLOCK_M"]
        if blocks is not None:
            prefix = None  # the long-block forward does the prefix's work in its own calls
        # Dense-prefix queries (their first topk blocks) are block rank < topk within their sequence.
        skip = None if prefix is None else (layout.token_block - layout.token_first_block) < topk
        sched = None
        state = None
        if blocks is not None:
            out, lse = cudnn_blocks.forward(q, k, v, layout, block_idx, scale, blocks)
        else:
            out = _empty(*q.shape, dtype=q.dtype, device=q.device)
            if need_grad:
                sched = Schedule(block_idx, layout.num_blocks, bm_f, skip)

                def sparse(o):
                    return _forward(q, k, v, layout, sched, scale, o)[1]
            else:

                def sparse(o):
                    return _forward_in_pieces(q, k, v, layout, topk, scale, skip, bm_f, o)
            if prefix is None:
                lse = sparse(out)
            else:
                lse, state = _forward_with_prefix(q, k, v, out, prefix, scale, need_grad, sparse)
            if sched is not None:
                sched.block_idx = None  # the backward does not need it; do not keep [T, H, S] alive until then
        if need_grad:
            lists = BwdLists(block_idx, layout.num_blocks, skip)
            # The separate dQ pass (not fused) walks tiles like the forward's, of the backward's size.
            dq_sched = None
            if not fused:
                dq_sched = sched if sched is not None and bm_b == bm_f else Schedule(
                    block_idx, layout.num_blocks, bm_b, skip)
                dq_sched.block_idx = None
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.lists, ctx.dq_sched, ctx.layout, ctx.scale, ctx.fused = lists, dq_sched, layout, scale, fused
            ctx.prefix, ctx.prefix_state = prefix, state
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        if ctx.prefix is not None and not dout.is_contiguous():
            dout = dout.contiguous()  # cuDNN's backward takes dO in the layout of the saved output
        dq, dk, dv = _backward(q, k, v, out, dout, lse, ctx.layout, ctx.lists, ctx.dq_sched, ctx.scale, ctx.fused)
        if ctx.prefix is not None:
            # After the sparse part, whose float32 dQ buffer is freed by now: the dense part's gradients
            # then fit in that memory and the peak does not grow.
            dense_prefix.backward(dout, q, k, v, out, dq, dk, dv, ctx.prefix, ctx.scale, ctx.prefix_state)
        return dq, dk, dv, None, None, None, None, None


def _contig_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# When top-k covers every block, MoBA *is* dense causal attention; PyTorch's fused dense kernels
# (cuDNN first) then do the same arithmetic faster than a block-sparse schedule could. Tests switch this
# off to exercise the sparse kernels on that case too.
DENSE_WHEN_FULL = True


def covers_all(longest: int, chunk_size: int, topk: int) -> bool:
    """Whether top-k covers every block of a sequence of ``longest`` tokens (MoBA is then dense)."""
    return topk >= -(-longest // chunk_size)


def _dense_causal(q, k, v, cu_seqlens: list[int] | None, scale: float) -> torch.Tensor:
    """Dense causal attention through SDPA, cuDNN first. q ``[B, S, Hq, D]`` (``cu_seqlens`` None) or
    packed ``[T, Hq, D]`` with host-side ``cu_seqlens``; returns q's shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    order.append(SDPBackend.MATH)
    gqa = q.shape[-2] != k.shape[-2]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with sdpa_kernel(order, set_priority=True):
        if cu_seqlens is None:
            o = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale,
                     enable_gqa=gqa)
            return o.transpose(1, 2).contiguous()  # callers may .view() the result, as with the kernels'
        outs = []
        for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True):
            if b > a:
                qs, ks, vs = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))
                outs.append(sdpa(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)[0].transpose(0, 1))
        return torch.cat(outs, 0) if outs else torch.empty_like(q)


def moba_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    topk: int,
    softmax_scale: float | None = None,
    prefix: dense_prefix.Prefix | None = None,
    blocks: cudnn_blocks.Plan | None = None,
) -> torch.Tensor:
    """MoBA with the Triton kernels. q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` -> ``[T, Hq, D]``.

    The sparse kernels, with the dense prefix ``prefix`` (:func:`.dense_prefix.plan`) through cuDNN, or
    with the forward in per-block cuDNN calls (``blocks``, :func:`.cudnn_blocks.plan`; then ``prefix`` is
    not used); :func:`moba_cli.moba_attention` decides beforehand whether the dense shortcut
    (``DENSE_WHEN_FULL``) applies and plans both.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q, k, v = _contig_last(q), _contig_last(k), _contig_last(v)
    return MobaFunction.apply(q, k, v, layout, topk, float(scale), prefix, blocks)
