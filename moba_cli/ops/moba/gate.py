"""The MoBA gate on the GPU: float32 block means, then each (query, head) keeps its ``topk - 1`` best
complete past blocks by ``q . mean(block keys)`` (ties: the earlier block), plus its own block.

Pipeline steps 1-2 (see :mod:`.function` for the whole pipeline):

1. ``_block_mean_kernel``: float32 mean key of every block, ``[NB, Hkv, D]``.
2. Gate: a streaming top-k, so the ``[T, NB]`` score matrix is never written. ``_gate_kernel`` merges a
   sorted candidate list tile by tile; ``_gate_grouped_kernel`` (many blocks, few to keep) tracks only the
   best groups of 16 blocks. Output ``block_idx [T, Hq, slots]`` as in :mod:`.naive` (the rule's
   float32 reference, :func:`.naive.select_blocks`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moba_cli.errors import MobaError

from .common import empty, is_interp
from .layout import BlockLayout, num_slots
from .options import KernelOptions, resolve
from .triton_keys import pack_keys

MAX_GATE_CANDIDATES = 128
# Gates: "grouped" (group maxima; the kept groups' scores in scratch memory) or "sort" (a sorted
# candidate list merged every tile). Grouped is faster with many blocks and few past blocks to keep;
# measured on the H200 (results/kernel-dev/v6-gate-probe.jsonl.log, v5-gate-probe.json): 4096 blocks,
# 7 kept: 69.6 vs 144.6 ms; 2048 blocks, 7 kept: 5.4 vs 9.3 ms; but 256 blocks, 7 kept: 2.3 vs 1.4 ms,
# and 15 kept at 1024 blocks (v5): 10.8 vs 5.0 ms.
# KernelOptions.gate_kind (MOBA_GATE_KIND) forces one (tests, probes); the grouped kernel takes up to 16.
GROUPED_GATE_MAX = 16
GROUPED_GATE_DEFAULT_MAX = 8
GROUPED_GATE_MIN_BLOCKS = 1024

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


def block_means(k: torch.Tensor, layout: BlockLayout, poison: bool = False) -> torch.Tensor:
    """Float32 mean key of every block. k ``[T, Hkv, D]`` -> ``[NB, Hkv, D]``."""
    nb, hkv, d = layout.num_blocks, k.shape[1], k.shape[2]
    km = empty(nb, hkv, d, dtype=torch.float32, device=k.device, poison=poison)
    if nb:
        _block_mean_kernel[(nb, hkv)](
            k, layout.block_start, layout.block_end, km,
            k.stride(0), k.stride(1), km.stride(0), km.stride(1),
            D=d, BLOCK_T=16 if is_interp() else 64,
        )
    return km


def all_past_blocks(layout: BlockLayout, hq: int, slots: int, rows: slice = slice(None)) -> torch.Tensor:
    """Selection when top-k covers every block: own block, then every past block in order."""
    tb, fb = layout.token_block[rows], layout.token_first_block[rows]
    past = fb[:, None] + torch.arange(slots - 1, device=tb.device, dtype=torch.int32)[None, :]
    past = torch.where(past < tb[:, None], past, torch.full_like(past, -1))
    sel = torch.cat([tb[:, None], past], dim=1)
    return sel[:, None, :].expand(-1, hq, -1).contiguous()


def gate_kind(npast: int, max_blocks: int, forced: str | None = None) -> str:
    """``"grouped"`` or ``"sort"`` for ``npast`` past blocks to keep among up to ``max_blocks`` blocks per
    sequence (``forced``: KernelOptions.gate_kind, where the grouped kernel can take ``npast``)."""
    kind = forced
    if kind is None:
        many = max_blocks >= GROUPED_GATE_MIN_BLOCKS
        kind = "grouped" if npast <= GROUPED_GATE_DEFAULT_MAX and many else "sort"
    return "sort" if npast > GROUPED_GATE_MAX else kind


def index_dtype(num_blocks: int) -> torch.dtype:
    """The narrowest integer type for the block indices (and -1) of ``num_blocks`` blocks."""
    return torch.int16 if num_blocks < 2**15 else torch.int32


def select_blocks(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout, topk: int,
                  options: KernelOptions | None = None, rows: slice = slice(None), km: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """The gate on the GPU: q ``[T, Hq, D]``, k ``[T, Hkv, D]`` -> ``block_idx [T, Hq, slots]`` int32.

    ``rows``: only the queries ``q[rows]`` (a contiguous range; ``[len, Hq, slots]`` then). ``km``: the
    block means of ``k`` (:func:`block_means`) when the caller has them. ``dtype``: int16 halves the lists
    where every block index fits (:func:`index_dtype`)."""
    opts = resolve(options)
    q = q[rows]
    tb, fb = layout.token_block[rows], layout.token_first_block[rows]
    t_total, hq, d = q.shape
    slots = num_slots(topk, layout.max_blocks)
    if slots == 1:
        return tb[:, None, None].expand(-1, hq, 1).to(dtype)
    if topk >= layout.max_blocks:
        return all_past_blocks(layout, hq, slots, rows).to(dtype)
    npast = slots - 1
    if npast > MAX_GATE_CANDIDATES:
        raise MobaError(
            f"the triton backend supports topk up to {MAX_GATE_CANDIDATES + 1} unless topk covers every "
            f"block (got topk={topk} with up to {layout.max_blocks} blocks per sequence)"
        )
    km = block_means(k, layout, opts.poison_outputs) if km is None else km
    out = empty(t_total, hq, slots, dtype=dtype, device=q.device, poison=opts.poison_outputs)
    exact = q.dtype == torch.float32 or is_interp()
    split = q.dtype == torch.bfloat16 and not is_interp()
    kind = gate_kind(npast, layout.max_blocks, opts.gate_kind)
    common = dict(G=hq // k.shape[1], NPAST=npast, D=d, PREC="ieee" if exact else "tf32x3", SPLIT=split)
    cfg = opts.gate_cfg
    # The bf16 halves of the float32 means are made once here, not in every program's loop.
    km_hi = km.to(q.dtype) if split else km
    km_lo = (km - km_hi.float()).to(q.dtype) if split else km
    args = (q, km, km_hi, km_lo, tb, fb, out)
    strides = (q.stride(0), q.stride(1), km.stride(0), km.stride(1), out.stride(0), out.stride(1))
    if kind == "grouped":
        ng = max(2, triton.next_power_of_2(npast))
        block_m, block_n, num_warps, num_stages = (16 if is_interp() else (64 if ng <= 8 else 32)), 16, 4, 3
        per_sm = None
        if cfg:
            block_m, block_n, num_warps = cfg[0], max(cfg[1], triton.next_power_of_2(npast)), cfg[2]
            num_stages = cfg[3] if len(cfg) > 3 else num_stages
            per_sm = cfg[4] if len(cfg) > 4 else None
        ntiles = triton.cdiv(t_total, block_m) * hq
        kw = dict(H=hq, NG=ng, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **common)
        # (km stands in for the scratch pointer while the kernel is compiled to size the launch)
        progs = persistent_programs(_gate_grouped_kernel, q.device, ntiles, per_sm, (
            *args, km, t_total, ntiles, *strides), kw)
        scratch = torch.empty(progs * block_m * ng * block_n, dtype=torch.float32, device=q.device)
        _gate_grouped_kernel[(progs,)](*args, scratch, t_total, ntiles, *strides, **kw)
        return out
    block_n = max(16, triton.next_power_of_2(npast))
    block_m = 16 if is_interp() else (64 if block_n <= 32 else 32)
    num_warps = 4
    if cfg:
        block_m, block_n, num_warps = cfg[0], max(block_n, cfg[1]), cfg[2]
    _gate_kernel[(triton.cdiv(t_total, block_m), hq)](
        *args, t_total, *strides, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, **common,
    )
    return out


_RESIDENT: dict = {}


def persistent_programs(kernel, device: torch.device, ntiles: int, per_sm: int | None, args: tuple,
                         kw: dict) -> int:
    """Programs for a persistent launch: as many as the GPU holds at once (from the compiled kernel's
    registers and shared memory), at most ``ntiles``. More would run as a second, partly empty wave."""
    if is_interp():
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
