"""The sparse backward (pipeline step 5, see :mod:`.function`).

``_bwd_dkdv_kernel`` owns one key tile of one block and loops over every query (of every head in its KV
group) that chose the block, so dK/dV stay in registers and K/V are never copied per query head; the
queries come from :class:`~.schedule.BwdLists` (per head and block: its own queries, then the ones that
chose it as a past block, two runs instead of one per slot). By default (``KernelOptions.bwd_fused``) it
also adds each query's dQ share with float32 atomics. Without that, ``_bwd_dq_kernel`` walks the
forward's tiles and merges dQ slot by slot, deterministically. On Hopper with bf16 or fp16 and head dim
128 the same work runs in the Gluon kernel of :mod:`.gluon_bwd` (``KernelOptions.bwd_gluon``), which
orders its asynchronous products and row copies by hand.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import gluon_compat
from .common import LOG2E, empty, fixed_launch_config, hopper, is_interp, prec
from .layout import BlockLayout
from .options import KernelOptions
from .schedule import BwdLists, Schedule, tile_queries


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
        h, hk, ks, kend, free, t, rvalid = tile_queries(
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


def bwd_config(d: int, dtype: torch.dtype, fused: bool, cfg: tuple[int, ...] | None = None) -> dict:
    """Launch config of the backward; ``cfg`` (KernelOptions.bwd_cfg) overrides it."""
    fixed = fixed_launch_config(cfg)
    if fixed:
        return fixed
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    if fused:
        # H200 (results/kernel-dev/v6-bwd-probe*.json): 128-key tiles over 8 warps carry dK, dV and the dQ
        # share; 64-key tiles on 4 warps spill and run at half the speed. Two stages beat one at both
        # presets (paper 1M 209 vs 237 ms; flashmoba 512K 62 vs 66 ms).
        return {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


# Backward: dQ from atomic adds in the dK/dV kernel ("fused", 5 products per tile pair; the float32 sums
# are not bit-reproducible run to run) or from its own slot-wise pass (7 products, deterministic):
# KernelOptions.bwd_fused.


# Backward on Hopper: the Gluon kernel (gluon_bwd.py: hand-ordered asynchronous MMAs and row copies) for
# bf16 or fp16 with head dim 128, else the Triton kernel below (H200, paper 1M: 159 vs 192 ms; 128K x 8 heads
# 135 vs 158 ms; results/kernel-dev/v8-bwd-gluon.json). KernelOptions.bwd_gluon=False turns it off.


def gluon_available() -> bool:
    """Whether this Triton has the Gluon API gluon_bwd.py uses (Triton 3.6 to 3.8; :mod:`.gluon_compat`)."""
    return gluon_compat.gluon_supported()[0]


def _gluon_bwd_usable(q: torch.Tensor) -> bool:
    # bf16 and fp16: both run in the GPU suite against the Triton kernel and the float32 reference.
    if is_interp() or not q.is_cuda or not hopper(q.device) or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    # gluon_usable warns once where the API is missing: the op then runs the Triton backward
    return q.shape[-1] == 128 and gluon_compat.gluon_usable()


def bwd_gluon(q: torch.Tensor, opts: KernelOptions) -> bool:
    """Whether the backward of ``q``'s call runs the Gluon kernel: where it applies (Hopper, bf16/fp16, head
    dim 128, a Triton with the Gluon API it uses), unless ``opts.bwd_gluon`` is off."""
    return opts.bwd_gluon and _gluon_bwd_usable(q)


def backward(q, k, v, out, dout, lse, layout: BlockLayout, lists: BwdLists, sched: Schedule | None, scale: float,
             fused: bool, opts: KernelOptions):
    """dQ, dK, dV. ``lists``: the dK/dV kernels' query lists; ``sched``: the dQ pass's tiles (not fused)."""
    t_total, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    cfg = bwd_config(d, q.dtype, fused, opts.bwd_cfg)
    poison = opts.poison_outputs
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    delta = empty(t_total, hq, dtype=torch.float32, device=q.device, poison=poison)
    bm = 16 if is_interp() else 64
    _delta_kernel[(triton.cdiv(t_total, bm), hq)](
        out, dout, delta, t_total, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        H=hq, D=d, BLOCK_M=bm,
    )
    if not fused and (sched is None or sched.block_m != cfg["BLOCK_M"]):
        raise RuntimeError("the dQ pass needs a schedule of the backward's tile size")
    # Fused: dQ gathers atomic adds from the dK/dV kernel, so it starts at zero.
    if fused:
        dq_acc = torch.zeros(t_total, hq, d, dtype=torch.float32, device=q.device)
    else:
        dq_acc = empty(t_total, hq, d, dtype=torch.float32, device=q.device, poison=poison)
    for s in range(0 if fused or sched is None or not sched.tiles_bound else sched.slots):
        _bwd_dq_kernel[(sched.tiles_bound,)](
            q, k, v, dout, lse, delta, dq_acc,
            sched.pair_t, sched.group_off, sched.group_cnt, sched.tile_group, sched.tile_off, sched.slot_first,
            layout.block_start, layout.block_end,
            s, scale * LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq_acc.stride(0), dq_acc.stride(1),
            H=hq, NB=layout.num_blocks, G=g, D=d, FIRST=(s == 0), EVEN=layout.chunk_size % cfg["BLOCK_N"] == 0,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PREC=prec(q.dtype),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    dk = empty(*k.shape, dtype=k.dtype, device=k.device, poison=poison)
    dv = empty(*v.shape, dtype=v.dtype, device=v.device, poison=poison)
    nsub = triton.cdiv(layout.chunk_size, cfg["BLOCK_N"])
    ran_gluon = False
    if layout.num_blocks and fused and bwd_gluon(q, opts):
        from . import gluon_bwd

        # False where this Triton cannot compile the Gluon kernel (warned once): the Triton kernel below
        ran_gluon = gluon_bwd.launch(q, k, v, dout, lse, delta, dk, dv, dq_acc, lists, layout, scale, LOG2E)
    if layout.num_blocks and not ran_gluon:
        _bwd_dkdv_kernel[(layout.num_blocks * nsub, hkv)](
            q, k, v, dout, lse, delta, dk, dv, dq_acc,
            lists.pair_t, lists.group_off, lists.group_cnt, layout.block_start, layout.block_end,
            scale * LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            dq_acc.stride(0), dq_acc.stride(1),
            H=hq, NB=layout.num_blocks, NSUB=nsub, G=g, D=d,
            EVEN=layout.chunk_size % cfg["BLOCK_N"] == 0,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PREC=prec(q.dtype), FUSED_DQ=fused,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return dq_acc.to(q.dtype), dk, dv
