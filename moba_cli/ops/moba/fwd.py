"""The sparse forward (pipeline step 4, see :mod:`.function`): one program per tile of up to ``BLOCK_M``
gathered queries of one (slot, head, block) of a :class:`~.schedule.Schedule`: dense attention of those
queries over that block's keys with an online softmax, then a log-sum-exp merge into a float32
accumulator. Slots run as separate launches, and each query has at most one block per slot, so merges
never race and need no atomics. The own-block slot, which every query has, runs last and writes the
normalised output. With a dense prefix its rows run through cuDNN beside these launches
(:func:`forward_with_prefix`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dense_prefix
from .common import LOG2E, empty, hopper, is_interp, prec
from .layout import BlockLayout
from .options import KernelOptions
from .schedule import Schedule, tile_queries


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
    Q, K, V, KD, VD, ACC, M, L, OUT, LSE, SEL,
    PAIR_T, GROUP_OFF, GROUP_CNT, TILE_GROUP, TILE_OFF, SLOT_FIRST, BS, BE,
    slot, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_at, stride_ah, stride_mt,
    stride_ot, stride_oh, stride_st, stride_sh,
    H: tl.constexpr, NB, G: tl.constexpr, D: tl.constexpr,
    FIRST: tl.constexpr, LAST: tl.constexpr, EVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, DESC: tl.constexpr, PREFETCH: tl.constexpr,
):
    """One tile of slot ``slot``. ``FIRST``: the first launch, which stores the float32 partial result
    (``ACC``, ``M``, ``L``); later launches merge into it. ``LAST`` (slot 0, the own block, launched last):
    merges, normalises and writes ``OUT`` and ``LSE`` directly. A query takes part in the past-block
    slots only if its slot 1 is a block (``SEL [T, H, S]``): the gates fill slots best first, so a query
    with any past block has slot 1."""
    tile = tl.load(SLOT_FIRST + slot) + tl.program_id(0)
    if tile < tl.load(SLOT_FIRST + slot + 1):
        h, hk, ks, kend, free, t, rvalid = tile_queries(
            PAIR_T, GROUP_OFF, GROUP_CNT, TILE_GROUP, TILE_OFF, BS, BE, tile, NB, H, G, EVEN, BLOCK_M, BLOCK_N,
        )
        t64 = t.to(tl.int64)
        d = tl.arange(0, D)
        if PREFETCH and not FIRST:
            # The merge at the end reads this tile's float32 partial results (64 KiB for 128 rows), and with
            # one program per SM nothing else would run while it waits: ask L2 for those lines now, so the
            # read overlaps the attention (one bulk prefetch per row; padding rows point at a real row).
            tl.inline_asm_elementwise(
                f"cp.async.bulk.prefetch.L2.global [$1], {D * 4};", "=r,l", [ACC + t64 * stride_at + h * stride_ah],
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
        aptr = ACC + t64[:, None] * stride_at + h * stride_ah + d[None, :]
        mptr = t64 * stride_mt + h
        if FIRST and not LAST:
            tl.store(aptr, acc, mask=rvalid[:, None])
            tl.store(M + mptr, m_i, mask=rvalid)
            tl.store(L + mptr, l_i, mask=rvalid)
        else:
            if FIRST:
                mm = m_i
                ll = l_i
            else:
                ld = rvalid
                if LAST:
                    ld = ld & (tl.load(SEL + t64 * stride_st + h * stride_sh + 1, mask=rvalid, other=-1) >= 0)
                acc0 = tl.load(aptr, mask=ld[:, None], other=0.0)
                m0 = tl.load(M + mptr, mask=ld, other=float("-inf"))
                l0 = tl.load(L + mptr, mask=ld, other=0.0)
                mm = tl.maximum(m0, m_i)
                a0 = tl.math.exp2(m0 - mm)
                a1 = tl.math.exp2(m_i - mm)
                acc = acc0 * a0[:, None] + acc * a1[:, None]
                ll = l0 * a0 + l_i * a1
            if LAST:
                optr = OUT + t64[:, None] * stride_ot + h * stride_oh + d[None, :]
                tl.store(optr, (acc / ll[:, None]).to(OUT.dtype.element_ty), mask=rvalid[:, None])
                tl.store(LSE + mptr, mm + tl.math.log2(ll), mask=rvalid)
            else:
                tl.store(aptr, acc, mask=rvalid[:, None])
                tl.store(M + mptr, mm, mask=rvalid)
                tl.store(L + mptr, ll, mask=rvalid)


def fwd_config(d: int, dtype: torch.dtype, chunk: int, cfg: tuple[int, ...] | None = None) -> dict:
    """Launch config of the forward; ``cfg`` (KernelOptions.fwd_cfg) overrides it."""
    if cfg:
        return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), cfg, strict=True))
    if is_interp():
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



def kv_descriptors(k: torch.Tensor, v: torch.Tensor, cfg: dict, force: bool | None = None):
    """Host TMA descriptors over k, v ``[T, Hkv, D]`` viewed ``[T, Hkv*D]``, or ``(None, None)`` where
    they do not apply (not Hopper, strides that are not a plain row-major ``[T, Hkv*D]``, misalignment).

    By default only for the 128-row, 8-warp tiles (large chunks): H200, paper preset at 1M, attention
    61.3 -> 59.0 ms; the 64-row, 4-warp tiles of small chunks were slower with it (57 -> 85 ms).
    ``force`` (KernelOptions.fwd_desc) turns them on or off regardless.
    """
    if force is not None:  # KernelOptions.fwd_desc
        want = force
    else:
        want = hopper(k.device) and cfg["BLOCK_M"] >= 128 and cfg["num_warps"] >= 8
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


def forward(q, k, v, layout: BlockLayout, sched: Schedule, scale: float, opts: KernelOptions,
            out: torch.Tensor | None = None):
    """Launch the attention slots: the past-block slots first (slot 1 stores, later ones merge), then the
    own-block slot 0, which every query has, merges and writes the output (into ``out`` if given) and its
    log-sum-exp."""
    t_total, hq, d = q.shape
    g = hq // k.shape[1]
    cfg = fwd_config(d, q.dtype, layout.chunk_size, opts.fwd_cfg)
    poison = opts.poison_outputs
    if out is None:
        out = empty(*q.shape, dtype=q.dtype, device=q.device, poison=poison)
    lse = empty(t_total, hq, dtype=torch.float32, device=q.device, poison=poison)
    if sched.tiles_bound == 0:
        return out, lse
    if sched.slots > 1:
        acc = empty(t_total, hq, d, dtype=torch.float32, device=q.device, poison=poison)
        m = empty(t_total, hq, dtype=torch.float32, device=q.device, poison=poison)
        l_ = empty(t_total, hq, dtype=torch.float32, device=q.device, poison=poison)
    else:
        acc, m, l_ = out, lse, lse  # never touched: the only launch is first and last
    sel = sched.block_idx
    if sel is None:
        raise RuntimeError("this schedule's block_idx was released after its forward")
    kd, vd = kv_descriptors(k, v, cfg, opts.fwd_desc)
    use_desc = kd is not None
    kd, vd = (kd, vd) if use_desc else (k, v)
    for s in [*range(1, sched.slots), 0]:
        _fwd_kernel[(sched.tiles_bound,)](
            q, k, v, kd, vd, acc, m, l_, out, lse, sel,
            sched.pair_t, sched.group_off, sched.group_cnt, sched.tile_group, sched.tile_off, sched.slot_first,
            layout.block_start, layout.block_end,
            s, scale * LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            acc.stride(0), acc.stride(1), m.stride(0), out.stride(0), out.stride(1), sel.stride(0), sel.stride(1),
            H=hq, NB=layout.num_blocks, G=g, D=d, FIRST=s == min(1, sched.slots - 1), LAST=s == 0,
            EVEN=layout.chunk_size % cfg["BLOCK_N"] == 0,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PREC=prec(q.dtype), DESC=use_desc,
            PREFETCH=opts.fwd_prefetch and not is_interp(),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return out, lse


# The dense prefix's cuDNN forward runs on a second stream beside the sparse launches (KernelOptions.
# prefix_stream), filling the SMs that each slot's last wave leaves idle (H200, paper 128K x 8 heads:
# docs/perf-notes.md v9).
_SIDE_STREAMS: dict = {}


def forward_with_prefix(q, k, v, layout: BlockLayout, sched: Schedule, scale: float,
                        prefix: dense_prefix.Prefix, need_lse: bool, opts: KernelOptions):
    """:func:`forward` for the scheduled queries and :func:`.dense_prefix.forward` for the prefix rows,
    both into one output. Returns ``(out, lse, prefix_state)``."""
    out = empty(*q.shape, dtype=q.dtype, device=q.device, poison=opts.poison_outputs)
    ref = opts.cudnn_reference
    if not (opts.prefix_stream and q.is_cuda):
        out, lse = forward(q, k, v, layout, sched, scale, opts, out)
        return out, lse, dense_prefix.forward(q, k, v, out, prefix, scale, need_lse, ref)
    main = torch.cuda.current_stream(q.device)
    side = _SIDE_STREAMS.get(q.device.index)
    if side is None:
        side = _SIDE_STREAMS[q.device.index] = torch.cuda.Stream(q.device)
    side.wait_stream(main)  # inputs written and ``out`` allocated (and poisoned) on the main stream
    with torch.cuda.stream(side):
        state = dense_prefix.forward(q, k, v, out, prefix, scale, need_lse, ref)
    out, lse = forward(q, k, v, layout, sched, scale, opts, out)
    main.wait_stream(side)
    for x in state:
        if isinstance(x, torch.Tensor):
            # made on the side stream, used and freed on the main one: the allocator must not hand the
            # memory back to the side stream while main-stream work on it may still be queued
            x.record_stream(main)
    return out, lse, state
