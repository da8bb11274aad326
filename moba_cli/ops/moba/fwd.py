"""The sparse forward (pipeline step 4, see :mod:`.function`): one program per tile of up to ``BLOCK_M``
gathered queries of one (slot, head, block) of a :class:`~.schedule.Schedule`: dense attention of those
queries over that block's keys with an online softmax, then a log-sum-exp merge into the query's partial
result, kept in the output's own memory (float16 for 16-bit outputs) with a float32 running max and sum.
Slots run as separate launches, and each query has at most one block per slot, so merges never race and
need no atomics. The own-block slot, which every query has, runs last and writes the normalised output.
With a dense prefix its rows run through cuDNN beside these launches (:func:`run_with_prefix`); the
inference forward's pieces are in :mod:`.fwd_pieces`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dense_prefix
from .common import LOG2E, empty, fixed_launch_config, hopper, is_interp, prec
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
        h, hk, ks, kend, free, t, rvalid = tile_queries(
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


def fwd_config(d: int, dtype: torch.dtype, chunk: int, cfg: tuple[int, ...] | None = None) -> dict:
    """Launch config of the forward; ``cfg`` (KernelOptions.fwd_cfg) overrides it."""
    fixed = fixed_launch_config(cfg)
    if fixed:
        return fixed
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


def partial_view(out: torch.Tensor) -> torch.Tensor:
    """Where the forward keeps each query's partial result between slots: the output's own memory, as
    float16 for 16-bit outputs (11 significant bits against bfloat16's 8, so the merges stay within the
    final rounding's error) and as itself for float32. No second ``[T, H, D]`` buffer."""
    return out.view(torch.float16) if out.element_size() == 2 else out


def value_scales(v: torch.Tensor) -> torch.Tensor:
    """Per KV head, a power of two that maps ``max |v|`` into ``(2^13, 2^14]``: a normalised partial result
    is a convex combination of value rows, so scaled by this it fits float16 (max 65504) and keeps its
    relative precision away from float16's subnormals. v ``[T, Hkv, D]`` -> float32 ``[Hkv]`` (on the
    device, no host sync). Exactly 1 for float32 values, whose partials are stored unscaled."""
    if v.dtype == torch.float32 or v.shape[0] == 0:
        return torch.ones(v.shape[1], dtype=torch.float32, device=v.device)
    # max and -min separately: v.abs() would copy all of v first
    amax = torch.maximum(v.amax(dim=(0, 2)).float(), -v.amin(dim=(0, 2)).float())
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax)), torch.zeros_like(amax))
    return torch.exp2(14.0 - e)


def stats_buffers(lse: torch.Tensor, slots: int, poison: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The float32 running max and sum ``[rows, heads]`` kept between slots (None with one slot). The max
    lives in ``lse [rows, heads]`` itself: the last launch reads a row's max and then writes its
    log-sum-exp there, in the same program, so one ``[rows, heads]`` buffer less (4 MB at 1M tokens x 1
    head, 32 MB at 512K x 16)."""
    if slots < 2:
        return None
    return lse, empty(*lse.shape, dtype=torch.float32, device=lse.device, poison=poison)


class SlotLauncher:
    """Launches the forward kernel for one slot of a schedule. ``sel``: the block lists of the rows from
    ``row0`` on (the schedule's tokens are absolute); ``stats``: the running max/sum (None: one slot)."""

    def __init__(self, q, k, v, layout: BlockLayout, scale: float, opts: KernelOptions, out: torch.Tensor,
                 lse: torch.Tensor, stats, vscale: torch.Tensor, sel: torch.Tensor, row0: int = 0):
        self.q, self.k, self.v, self.layout, self.scale, self.opts = q, k, v, layout, scale, opts
        self.out, self.lse, self.vscale, self.sel, self.row0 = out, lse, vscale, sel, row0
        self.m, self.l_ = stats if stats is not None else (lse, lse)  # one slot: the only launch is last
        self.part = partial_view(out)
        self.cfg = fwd_config(q.shape[-1], q.dtype, layout.chunk_size, opts.fwd_cfg)
        kd, vd = kv_descriptors(k, v, self.cfg, opts.fwd_desc)
        self.use_desc = kd is not None
        self.kd, self.vd = (kd, vd) if self.use_desc else (k, v)

    def __call__(self, sched: Schedule, slot: int, first: bool, last: bool) -> None:
        """Slot ``slot`` of ``sched``; ``first``: it stores the partials, ``last``: it writes the output."""
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
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PREC=prec(q.dtype), DESC=self.use_desc,
            PREFETCH=self.opts.fwd_prefetch and not is_interp(),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )


def forward(q, k, v, layout: BlockLayout, sched: Schedule, scale: float, opts: KernelOptions,
            out: torch.Tensor | None = None):
    """Launch the attention slots: the past-block slots first (slot 1 stores, later ones merge), then the
    own-block slot 0, which every query has, merges and writes the output (into ``out`` if given) and its
    log-sum-exp. Partial results live in ``out`` itself (:func:`partial_view`)."""
    t_total, hq, d = q.shape
    poison = opts.poison_outputs
    if out is None:
        out = empty(*q.shape, dtype=q.dtype, device=q.device, poison=poison)
    lse = empty(t_total, hq, dtype=torch.float32, device=q.device, poison=poison)
    if sched.tiles_bound == 0:
        return out, lse
    sel = sched.block_idx
    if sel is None:
        raise RuntimeError("this schedule's block_idx was released after its forward")
    stats = stats_buffers(lse, sched.slots, poison)
    launch = SlotLauncher(q, k, v, layout, scale, opts, out, lse, stats, value_scales(v), sel)
    for s in [*range(1, sched.slots), 0]:
        launch(sched, s, first=s == min(1, sched.slots - 1), last=s == 0)
    return out, lse


# The dense prefix's cuDNN forward runs on a second stream beside the sparse launches (KernelOptions.
# prefix_stream), filling the SMs that each slot's last wave leaves idle (H200, paper 128K x 8 heads:
# docs/perf-notes.md v9).
_SIDE_STREAMS: dict = {}


def run_with_prefix(q, k, v, out: torch.Tensor, prefix: dense_prefix.Prefix, scale: float, need_lse: bool,
                    opts: KernelOptions, sparse, heads: int | None = None) -> tuple[torch.Tensor, tuple]:
    """``sparse(out) -> lse`` for the scheduled queries and :func:`.dense_prefix.forward` for the prefix
    rows (``heads`` query heads per cuDNN call, all if None), both into ``out``. Returns ``(lse,
    prefix_state)``."""
    ref = opts.cudnn_reference
    if not (opts.prefix_stream and q.is_cuda):
        lse = sparse(out)
        return lse, dense_prefix.forward(q, k, v, out, prefix, scale, need_lse, ref, heads)
    main = torch.cuda.current_stream(q.device)
    side = _SIDE_STREAMS.get(q.device.index)
    if side is None:
        side = _SIDE_STREAMS[q.device.index] = torch.cuda.Stream(q.device)
    side.wait_stream(main)  # inputs written and ``out`` allocated (and poisoned) on the main stream
    with torch.cuda.stream(side):
        state = dense_prefix.forward(q, k, v, out, prefix, scale, need_lse, ref, heads)
    lse = sparse(out)
    main.wait_stream(side)
    for x in state:
        if isinstance(x, torch.Tensor):
            # made on the side stream, used and freed on the main one: the allocator must not hand the
            # memory back to the side stream while main-stream work on it may still be queued
            x.record_stream(main)
    return lse, state
