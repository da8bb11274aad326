"""Hopper (sm_90) backward of MoBA's sparse attention, written in Gluon (Triton's explicit-layout dialect).

Same work as ``bwd._bwd_dkdv_kernel`` with the fused dQ: one program holds dK and dV of a
``BLOCK_N``-key tile in registers and walks the query tiles that chose the tile's block, five products per
tile pair. What Gluon lets us order by hand, and Triton 3.6 does not:

* ``K Q^T`` and ``V dO^T`` are issued back to back as asynchronous warp-group MMAs and waited for once;
* right after them go the next query tile's index load and gathered-row copies (``cp.async``, into the
  other half of a two-stage ring) and its per-query values (index, LSE, delta; one a thread), so their
  latency hides behind this tile's products instead of opening each iteration;
* dS^T is written to shared memory once, as computed, and read there by the dQ^T = K^T dS^T product
  (M = head dim: full-height MMAs); the dK and dV products take P^T and dS^T from registers;
* dQ^T goes to a layout of 4 consecutive head-dim values a thread and is added with 16-byte atomics.

Measured on the H200 against the Triton kernel (docs/perf-notes.md, v8, with the slot-major lists of
then): paper preset 1M x 1 head 159 vs 192 ms, 128K x 8 heads 135 vs 158 ms, dK and dV bit-identical.

Written for sm_90, head dim 128 and ``BLOCK_N`` = 128 keys; ``bwd.backward`` runs it for bf16 and fp16
(both checked in the GPU suite; ``MOBA_BWD_GLUON=0`` turns it off) and keeps its own kernel for everything
else. The queries come from ``schedule.BwdLists``: per head and block, the block's own queries, then
the ones that chose it as a past block. Shapes: q, dO ``[T, Hq, D]``; k, v
``[T, Hkv, D]``; lse, delta ``[T, Hq]`` float32 (lse in base 2, scaled); dQ ``[T, Hq, D]`` float32.
"""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

# Names that moved between Triton releases, and the fallback when this Triton cannot build the kernel.
from .gluon_compat import async_load, cta_barrier, gluon_supported, mark_unsupported, warn_fallback


@gluon.jit
def _issue_rows(q_buf, do_buf, Q, DO, PAIR_T, base, m0, cnt, h, stride_qt, stride_qh, stride_dot, stride_doh,
                D: gl.constexpr, BLOCK_M: gl.constexpr, LD: gl.constexpr):
    """Start copying the query tile ``PAIR_T[base + m0 ..][:BLOCK_M]``'s Q and dO rows into shared memory;
    rows at or past ``cnt`` are filled with zeros."""
    rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, LD))
    rmask = rows < cnt
    t = gl.load(PAIR_T + base + rows, mask=rmask, other=0).to(gl.int64)
    d = gl.arange(0, D, layout=gl.SliceLayout(0, LD))
    async_load(q_buf, Q + t[:, None] * stride_qt + h * stride_qh + d[None, :],
                                   mask=rmask[:, None])
    async_load(do_buf, DO + t[:, None] * stride_dot + h * stride_doh + d[None, :],
                                   mask=rmask[:, None])
    cp.commit_group()


@gluon.jit
def _tile_meta(PAIR_T, LSE, DELTA, base, m0, cnt, h, H: gl.constexpr, BLOCK_M: gl.constexpr, LM: gl.constexpr):
    """The query tile's token indices, log-sum-exps and deltas, one value a thread (layout LM)."""
    rm = m0 + gl.arange(0, BLOCK_M, layout=LM)
    rvalid = rm < cnt
    t = gl.load(PAIR_T + base + rm, mask=rvalid, other=0)
    t64 = t.to(gl.int64)
    lse = gl.load(LSE + t64 * H + h, mask=rvalid, other=0.0)
    delta = gl.load(DELTA + t64 * H + h, mask=rvalid, other=0.0)
    return t, lse, delta


@gluon.jit
def _query_tiles(dk, dv, k_s, v_s, q_s, do_s, ds_s, ks, ke,
                 Q, DO, LSE, DELTA, DQ, PAIR_T, base, m_start, cnt, h, qk_scale, sm_scale,
                 stride_qt, stride_qh, stride_dot, stride_doh, stride_dqt, stride_dqh,
                 H: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 MASK: gl.constexpr, LD: gl.constexpr, L_S: gl.constexpr, L_KV: gl.constexpr,
                 num_warps: gl.constexpr):
    """Add the query tiles ``PAIR_T[base + m_start .. base + cnt]`` into dK/dV (returned) and their dQ
    shares into DQ. With MASK, scores of keys past the tile's end or after the query are zeroed."""
    OP_A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=L_KV, k_width=2)
    # Per-query values, one a thread, loaded a tile ahead and moved into the score layout when used.
    LM: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    # dQ^T leaves the MMA layout for 4 consecutive head-dim values a thread: one 16-byte atomic add each.
    LQ: gl.constexpr = gl.BlockedLayout([4, 1], [32, 1], [1, num_warps], [0, 1])
    cols = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, L_S))
    dq_d = gl.arange(0, D, layout=gl.SliceLayout(1, LQ))
    dq_c = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, LQ))
    kn = ks + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, L_S))
    zero_s = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, L_S)
    # The previous group's last products may still be reading stage 0 in the other warp group.
    cta_barrier()
    if m_start < cnt:
        _issue_rows(q_s.index(0), do_s.index(0), Q, DO, PAIR_T, base, m_start, cnt, h,
                    stride_qt, stride_qh, stride_dot, stride_doh, D, BLOCK_M, LD)
    t_c, lse_c, dl_c = _tile_meta(PAIR_T, LSE, DELTA, base, m_start, cnt, h, H, BLOCK_M, LM)
    i = 0
    for m0 in range(m_start, cnt, BLOCK_M):
        stage = i % 2
        cp.wait_group(0)
        fence_async_shared()
        # Everyone's rows have landed, and every warp group is past the previous tile's products, so the
        # other stage is free for the next tile.
        cta_barrier()
        qb = q_s.index(stage)
        dob = do_s.index(stage)
        st = warpgroup_mma(k_s, qb.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        dpt = warpgroup_mma(v_s, dob.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        # The next tile's indices, row copies and per-query values go out while the tensor cores work.
        if m0 + BLOCK_M < cnt:
            _issue_rows(q_s.index(1 - stage), do_s.index(1 - stage), Q, DO, PAIR_T, base, m0 + BLOCK_M, cnt, h,
                        stride_qt, stride_qh, stride_dot, stride_doh, D, BLOCK_M, LD)
        t_n, lse_n, dl_n = _tile_meta(PAIR_T, LSE, DELTA, base, m0 + BLOCK_M, cnt, h, H, BLOCK_M, LM)
        rvalid = (m0 + cols) < cnt
        lse = gl.convert_layout(lse_c, gl.SliceLayout(0, L_S))
        delta = gl.convert_layout(dl_c, gl.SliceLayout(0, L_S))
        st, dpt = warpgroup_mma_wait(num_outstanding=0, deps=(st, dpt))
        pt = gl.exp2(st * qk_scale - lse[None, :])
        if MASK:
            t = gl.convert_layout(t_c, gl.SliceLayout(0, L_S))
            keep = (kn[:, None] < ke) & rvalid[None, :] & (kn[:, None] <= t[None, :])
            pt = gl.where(keep, pt, 0.0)
        dst = (pt * (dpt - delta[None, :])).to(q_s.dtype)
        ds_s.store(dst)
        fence_async_shared()
        cta_barrier()
        dv = warpgroup_mma(gl.convert_layout(pt.to(q_s.dtype), OP_A), dob, dv, is_async=True)
        dk = warpgroup_mma(gl.convert_layout(dst, OP_A), qb, dk, is_async=True)
        dqt = warpgroup_mma(k_s.permute((1, 0)), ds_s, zero_s, use_acc=False, is_async=True)
        dv, dk, dqt = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk, dqt))
        tq = gl.convert_layout(t_c, gl.SliceLayout(0, LQ)).to(gl.int64)
        qmask = (m0 + dq_c) < cnt
        gl.atomic_add(DQ + tq[None, :] * stride_dqt + h * stride_dqh + dq_d[:, None],
                      gl.convert_layout(dqt * sm_scale, LQ), mask=qmask[None, :], sem="relaxed")
        t_c = t_n
        lse_c = lse_n
        dl_c = dl_n
        i += 1
    return dk, dv


@gluon.jit(do_not_specialize=["NB", "NSUB"])
def bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ,
    PAIR_T, GROUP_OFF, GROUP_CNT, BS, BE,
    qk_scale, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh,
    H: gl.constexpr, NB, NSUB, G: gl.constexpr, D: gl.constexpr,
    EVEN: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, num_warps: gl.constexpr,
):
    """Grid ``(num_blocks * NSUB, Hkv)``: program (j * NSUB + sub, hk) owns keys ``BS[j] + sub * BLOCK_N``
    onwards (to the block's end) of KV head hk, for the G query heads that share it."""
    gl.static_assert(BLOCK_N == D, "dQ^T shares the score tile's layout: BLOCK_N must equal D")
    # 16-byte rows pieces, a warp over 2 rows x 128 columns, warps down the rows.
    LD: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])
    L_S: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    L_KV: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                   instr_shape=[16, D, 16])
    pid = gl.program_id(0)
    hk = gl.program_id(1)
    j = pid // NSUB
    ks_blk = gl.load(BS + j)
    ke = gl.load(BE + j)
    ks = ks_blk + (pid % NSUB) * BLOCK_N
    if ks < ke:
        dtype: gl.constexpr = Q.dtype.element_ty
        SL_KV: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], dtype)
        SL_Q: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], dtype)
        SL_DS: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
        k_s = gl.allocate_shared_memory(dtype, [BLOCK_N, D], SL_KV)
        v_s = gl.allocate_shared_memory(dtype, [BLOCK_N, D], SL_KV)
        q_s = gl.allocate_shared_memory(dtype, [2, BLOCK_M, D], SL_Q)
        do_s = gl.allocate_shared_memory(dtype, [2, BLOCK_M, D], SL_Q)
        ds_s = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], SL_DS)

        rk = ks + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LD))
        dl = gl.arange(0, D, layout=gl.SliceLayout(0, LD))
        rk64 = rk.to(gl.int64)
        kmask = rk < ke
        k_s.store(gl.load(K + rk64[:, None] * stride_kt + hk * stride_kh + dl[None, :], mask=kmask[:, None],
                          other=0.0))
        v_s.store(gl.load(V + rk64[:, None] * stride_vt + hk * stride_vh + dl[None, :], mask=kmask[:, None],
                          other=0.0))
        fence_async_shared()
        cta_barrier()
        dk = gl.zeros([BLOCK_N, D], gl.float32, L_KV)
        dv = gl.zeros([BLOCK_N, D], gl.float32, L_KV)
        for hh in range(G):
            h = hk * G + hh
            # The block's own queries in token order (BwdLists): those before this key tile see none of it.
            # Right after them in the list, the queries that chose the block as a past block.
            g = (h * NB + j) * 2
            off = gl.load(GROUP_OFF + g)
            n_own = gl.load(GROUP_CNT + g)
            dk, dv = _query_tiles(
                dk, dv, k_s, v_s, q_s, do_s, ds_s, ks, ke, Q, DO, LSE, DELTA, DQ, PAIR_T,
                off, ((ks - ks_blk) // BLOCK_M) * BLOCK_M, n_own, h,
                qk_scale, sm_scale, stride_qt, stride_qh, stride_dot, stride_doh, stride_dqt, stride_dqh,
                H, D, BLOCK_M, BLOCK_N, True, LD, L_S, L_KV, num_warps,
            )
            dk, dv = _query_tiles(
                dk, dv, k_s, v_s, q_s, do_s, ds_s, ks, ke, Q, DO, LSE, DELTA, DQ, PAIR_T,
                off + n_own, 0, gl.load(GROUP_CNT + g + 1), h,
                qk_scale, sm_scale, stride_qt, stride_qh, stride_dot, stride_doh, stride_dqt, stride_dqh,
                H, D, BLOCK_M, BLOCK_N, not EVEN, LD, L_S, L_KV, num_warps,
            )
        rko = ks + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, L_KV))
        dko = gl.arange(0, D, layout=gl.SliceLayout(0, L_KV))
        rko64 = rko.to(gl.int64)
        omask = (rko < ke)[:, None]
        gl.store(DK + rko64[:, None] * stride_dkt + hk * stride_dkh + dko[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=omask)
        gl.store(DV + rko64[:, None] * stride_dvt + hk * stride_dvh + dko[None, :], dv.to(DV.dtype.element_ty),
                 mask=omask)


def launch(q, k, v, dout, lse, delta, dk, dv, dq_acc, lists, layout, scale: float, log2e: float) -> bool:
    """Run ``bwd_dkdv_kernel`` over every key tile (64-query x 128-key tiles, 8 warps); ``lists``:
    ``schedule.BwdLists``. False, with one warning and nothing written, where this Triton cannot compile the
    kernel (its Gluon API changed): the caller then runs the Triton backward."""
    d = q.shape[-1]
    hq, hkv = q.shape[1], k.shape[1]
    block_n, block_m = 128, 64
    nsub = triton.cdiv(layout.chunk_size, block_n)
    args = (
        q, k, v, dout, lse, delta, dk, dv, dq_acc,
        lists.pair_t, lists.group_off, lists.group_cnt, layout.block_start, layout.block_end,
        scale * log2e, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        dq_acc.stride(0), dq_acc.stride(1),
    )
    consts = dict(H=hq, NB=layout.num_blocks, NSUB=nsub, G=hq // hkv, D=d, EVEN=layout.chunk_size % block_n == 0,
                  BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8)
    grid = (layout.num_blocks * nsub, hkv)
    if not _compiles(args, consts, grid, (q.dtype, d, consts["EVEN"])):
        return False
    bwd_dkdv_kernel[grid](*args, **consts)
    return True


_COMPILED: set = set()  # (dtype, head dim, EVEN) settings that compiled in this process


def _compiles(args: tuple, consts: dict, grid: tuple, setting: tuple) -> bool:
    """Compile the kernel for this launch without running it, the first time a setting is seen. Anything
    the compiler raises means this Triton's Gluon differs from the one the kernel was written for."""
    if setting in _COMPILED:
        return True
    ok, why = gluon_supported()
    if ok:
        try:
            bwd_dkdv_kernel.warmup(*args, grid=grid, **consts)
        except Exception as exc:  # warmup only compiles: every error here is the compiler's
            lines = [ln for ln in str(getattr(exc, "error_message", None) or exc).splitlines() if ln.strip()]
            why = (f"it does not compile with Triton {triton.__version__} "
                   f"({type(exc).__name__}: {lines[-1].strip()[:200] if lines else ''})")
            mark_unsupported(why)
            ok = False
    if not ok:
        warn_fallback(why)
        return False
    _COMPILED.add(setting)
    return True
