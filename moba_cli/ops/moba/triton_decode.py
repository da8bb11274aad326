"""Fused Triton kernels for MoBA decode: one new query token per sequence against a KV cache.

Four launches, none of which touches an unchosen block's keys or values:

1. ``_gate_tile_kernel``, grid ``(B * Hkv * score tiles,)``: every program scores ``TILE`` complete past
   blocks for the ``G`` query heads of one KV group (``q . mean`` in float32) and keeps each head's best
   ``topk - 1`` as int64 keys ordered like (score, earlier block): score bits high, reversed block id
   low, so the largest key is the highest score and, among equal scores, the earlier block (the tie
   rule). Keys are unique, so repeated max-extraction yields the top list in order.
2. ``_gate_merge_kernel``, grid ``(B * Hkv,)``: merges the tiles' candidates into each head's top
   ``topk - 1``, writes ``block_ids [B, Hq, slots]`` (slot 0 = own block, then decreasing score, -1 when
   missing) and the group's *union* of chosen blocks (past blocks in order of first appearance, own
   block last) with its count.
3. ``_attn_kernel``, grid ``(B * Hkv * union entries * splits,)``: flash-decoding over one split of one
   union block for all ``G`` heads of the group at once; heads that did not choose the block are masked
   out, so each K/V tile is read once per group. Each head that chose the block writes its partial
   ``(o, lse)`` at ``(head, slot of the block in its list, split)``.
4. ``_combine_kernel``, grid ``(B * Hq,)``: merges a head's ``slots * splits`` partials by log-sum-exp.

Every cache offset is computed in int64: a 1M-token cache has more than 2^31 elements.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .layout import decode_slots
from .triton_keys import pack_keys

# Below every packed gate key: the high half of a real key is at least -2^31 and its low half is a
# reversed block id (never 0 for a real block), so no real key equals it.
NEG_KEY = -(2**63)


@triton.jit
def _gate_tile_kernel(
    Q, BM, SEQ, KEYS,
    stride_qb, stride_qh, stride_qd,
    stride_mb, stride_mn, stride_mh, stride_md,
    chunk_size, n_tiles,
    HKV: tl.constexpr, G: tl.constexpr, GD: tl.constexpr, D: tl.constexpr,
    K_PAD: tl.constexpr, NPAST: tl.constexpr, TILE: tl.constexpr, NEG: tl.constexpr,
):
    # One grid axis: the second and third are capped at 65535 programs.
    pid = tl.program_id(0)
    bh = pid // n_tiles
    t = pid % n_tiles
    b = bh // HKV
    h = bh % HKV
    n = tl.load(SEQ + b)
    own = (n - 1) // chunk_size
    # The merge kernel only reads tiles that start before the own block, so the others do nothing.
    if t * TILE < own:
        g = tl.arange(0, GD)
        d = tl.arange(0, D)
        col = tl.arange(0, TILE)
        kc = tl.arange(0, K_PAD)
        gm = g < G
        q_ptr = Q + b.to(tl.int64) * stride_qb + (h * G + g)[:, None].to(tl.int64) * stride_qh + d[None, :] * stride_qd
        q = tl.load(q_ptr, mask=gm[:, None], other=0.0).to(tl.float32)
        blk = t * TILE + col
        valid = blk < own
        m_ptr = (
            BM + b.to(tl.int64) * stride_mb + blk[:, None].to(tl.int64) * stride_mn
            + h.to(tl.int64) * stride_mh + d[None, :] * stride_md
        )
        means = tl.load(m_ptr, mask=valid[:, None], other=0.0)
        # Exact float32 products (no TF32): the gate must match the float32 reference's choice.
        s = tl.dot(q, tl.trans(means), input_precision="ieee")  # [GD, TILE]
        key = tl.where(valid[None, :], pack_keys(s, blk[None, :]), NEG)
        # Keys are unique, so extracting the max NPAST times gives each head's best, best first.
        best = tl.full([GD, K_PAD], NEG, tl.int64)
        for i in range(NPAST):
            top = tl.max(key, 1)
            best = tl.where(kc[None, :] == i, top[:, None], best)
            key = tl.where(key == top[:, None], NEG, key)
        out = KEYS + ((bh * G + g[:, None]).to(tl.int64) * n_tiles + t) * K_PAD + kc[None, :]
        tl.store(out, best, mask=gm[:, None])


@triton.jit
def _gate_merge_kernel(
    KEYS, SEQ, IDS, UNION, COUNT,
    chunk_size, n_tiles, u_max,
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    K_PAD: tl.constexpr, NPAST: tl.constexpr, SLOTS: tl.constexpr, TILE: tl.constexpr,
    T2: tl.constexpr, NEG: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    n = tl.load(SEQ + b)
    own = (n - 1) // chunk_size
    g = tl.arange(0, GP)
    col = tl.arange(0, T2)
    kc = tl.arange(0, K_PAD)
    gm = g < G
    # best [GP, K_PAD] is each head's running top list; every step appends T2 - K_PAD new candidates
    # to it in one [GP, T2] tile (first K_PAD columns: the list) and extracts the new top list.
    best = tl.full([GP, K_PAD], NEG, tl.int64)
    if NPAST > 0:
        n_cand = tl.cdiv(own, TILE) * K_PAD
        row = KEYS + (bh * G + g[:, None]).to(tl.int64) * (n_tiles * K_PAD)
        wide = tl.full([GP, T2], NEG, tl.int64)
        for e0 in range(0, n_cand, T2 - K_PAD):
            e = e0 + col - K_PAD
            fresh = (col >= K_PAD) & (e < n_cand)
            x = tl.load(row + e[None, :], mask=gm[:, None] & fresh[None, :], other=NEG)
            key = tl.where(col[None, :] < K_PAD, wide, x)
            wide = tl.full([GP, T2], NEG, tl.int64)
            for i in range(NPAST):
                top = tl.max(key, 1)
                wide = tl.where(col[None, :] == i, top[:, None], wide)
                best = tl.where(kc[None, :] == i, top[:, None], best)
                key = tl.where(key == top[:, None], NEG, key)
    ids = tl.where(best == NEG, -1, 0x7FFFFFFF - (best & 0x7FFFFFFF)).to(tl.int32)  # [GP, K_PAD]
    ids_row = IDS + (b * (HKV * G) + h * G + g).to(tl.int64) * SLOTS
    tl.store(ids_row, tl.zeros([GP], tl.int32) + own, mask=gm)
    in_list = gm[:, None] & (kc[None, :] < NPAST)
    tl.store(ids_row[:, None] + 1 + kc[None, :], ids, mask=in_list)
    # Union of the group's past blocks, in (head, slot) order of first appearance: an id is dropped
    # when an earlier head of the group also chose it (ids within one head are distinct).
    take = in_list & (ids >= 0)
    for other in range(G - 1):
        seen = tl.max(tl.where(g[:, None] == other, ids, -1), 0)  # head `other`'s list [K_PAD]
        dup = tl.max((ids[:, :, None] == seen[None, None, :]).to(tl.int32), 2) > 0
        take = take & ~(dup & (g[:, None] > other))
    flat = tl.reshape(take.to(tl.int32), [GP * K_PAD])
    pos = tl.reshape(tl.cumsum(flat, 0) - 1, [GP, K_PAD])
    urow = UNION + bh.to(tl.int64) * u_max
    tl.store(urow + pos, ids, mask=take)
    c = tl.sum(flat, 0)
    tl.store(urow + c, own)
    tl.store(COUNT + bh, c + 1)


@triton.jit
def _attn_kernel(
    Q, K, V, SEQ, IDS, UNION, COUNT, PO, PL,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    chunk_size, split_n, n_split, u_max, qk_scale,
    HKV: tl.constexpr, G: tl.constexpr, GD: tl.constexpr, D: tl.constexpr,
    SLOTS: tl.constexpr, SP: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = pid // (u_max * n_split)
    us = pid % (u_max * n_split)
    u = us // n_split
    split = us % n_split
    b = bh // HKV
    h = bh % HKV
    cnt = tl.load(COUNT + bh)
    if u < cnt:
        blk = tl.load(UNION + bh.to(tl.int64) * u_max + u)
        n = tl.load(SEQ + b)
        lo = blk * chunk_size + split * split_n
        hi = tl.minimum(tl.minimum(lo + split_n, (blk + 1) * chunk_size), n)
        g = tl.arange(0, GD)
        d = tl.arange(0, D)
        gm = g < G
        head = (b * (HKV * G) + h * G + g).to(tl.int64)  # [GD] global query-head rows
        # Which heads of the group chose this block, and in which slot of their list (a few ints).
        j = tl.arange(0, SP)
        ids = tl.load(IDS + head[:, None] * SLOTS + j[None, :], mask=gm[:, None] & (j[None, :] < SLOTS), other=-1)
        match = ids == blk
        chose = (tl.sum(match.to(tl.int32), 1) > 0) & gm
        slot = tl.sum(tl.where(match, j[None, :], 0), 1)
        q_ptr = Q + b.to(tl.int64) * stride_qb + (h * G + g)[:, None].to(tl.int64) * stride_qh + d[None, :] * stride_qd
        q = tl.load(q_ptr, mask=gm[:, None], other=0.0)
        k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        m_i = tl.full([GD], float("-inf"), tl.float32)
        l_i = tl.zeros([GD], tl.float32)
        acc = tl.zeros([GD, D], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            km = offs < hi
            offs64 = offs.to(tl.int64)
            k = tl.load(k_base + offs64[:, None] * stride_kl + d[None, :] * stride_kd, mask=km[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # log2 domain
            s = tl.where(chose[:, None] & km[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Rows with nothing allowed yet keep m = -inf; shift by 0 there so exp2 gives 0, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs64[:, None] * stride_vl + d[None, :] * stride_vd, mask=km[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new
        ok = l_i > 0.0
        # An empty split (past the end of the own block) still writes lse = -inf for its heads.
        lse = tl.where(ok, m_i + tl.log2(tl.where(ok, l_i, 1.0)), float("-inf"))
        o = acc / tl.where(ok, l_i, 1.0)[:, None]
        part = (head * SLOTS + slot) * n_split + split
        tl.store(PL + part, lse, mask=chose)
        tl.store(PO + part[:, None] * D + d[None, :], o, mask=(chose & ok)[:, None])


@triton.jit
def _combine_kernel(
    PO, PL, IDS, OUT,
    stride_ob, stride_oh, stride_od,
    n_split,
    HQ: tl.constexpr, D: tl.constexpr, SLOTS: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)  # b * Hq + query head
    b = pid // HQ
    hq = pid % HQ
    n_e = SLOTS * n_split
    e = tl.arange(0, BLOCK_E)
    d = tl.arange(0, D)
    base = pid.to(tl.int64) * n_e
    m = tl.full([], float("-inf"), tl.float32)
    den = tl.zeros([], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for e0 in range(0, n_e, BLOCK_E):
        ee = e0 + e
        # Slots without a block (-1) were never written.
        blk = tl.load(IDS + pid.to(tl.int64) * SLOTS + ee // n_split, mask=ee < n_e, other=-1)
        lse = tl.load(PL + base + ee, mask=blk >= 0, other=float("-inf"))
        has = lse > float("-inf")
        o = tl.load(PO + (base + ee)[:, None] * D + d[None, :], mask=has[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp2(lse - m_safe)
        alpha = tl.exp2(m - m_safe)
        den = den * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        m = m_new
    # The own block holds the query's own key, so every head has at least one term: den > 0.
    out = acc / den
    o_ptr = OUT + b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh + d * stride_od
    tl.store(o_ptr, out.to(OUT.dtype.element_ty))


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def moba_decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_means: torch.Tensor,
    chunk_size: int,
    topk: int,
    softmax_scale: float,
    *,
    out: torch.Tensor | None = None,
    return_plan: bool = False,
    block_n: int | None = None,
    target_programs: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
):
    """Launch the four kernels on validated inputs (see :func:`moba_cli.ops.moba.decode.moba_decode`).

    ``out`` (``[B, Hq, D]`` in q's dtype) is written if given. With ``return_plan`` also returns
    ``{"block_ids" [B, Hq, slots], "union" [B, Hkv, u_max], "count" [B, Hkv], "n_split", "split_n"}``:
    what was read, for tests and byte counts. ``block_n``, ``target_programs`` (attention programs to
    aim for; sets the split of each block), ``num_warps`` and ``num_stages`` are tuning knobs.
    """
    bsz, hq, d = q.shape
    cache_len, hkv = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    dev = q.device
    slots = decode_slots(topk, cache_len, chunk_size)
    npast = slots - 1
    np_max = (cache_len - 1) // chunk_size  # most complete past blocks any query can have
    k_pad = _pow2(max(npast, 1))
    tile = max(64, k_pad)
    gd = max(16, _pow2(g))  # tl.dot wants at least 16 rows
    gp = _pow2(g)
    u_max = min(g * npast, np_max) + 1
    n_tiles = triton.cdiv(np_max, tile) if npast > 0 else 0
    # The merge keeps its candidate tile near 4096 keys: one step for most shapes (each step is npast
    # dependent max-reductions, the gate's latency), few registers for large groups.
    t2 = max(2 * k_pad, min(_pow2(n_tiles * k_pad + k_pad), max(32, 4096 // gp)))
    seq = cache_seqlens.contiguous()
    ids = torch.empty(bsz, hq, slots, dtype=torch.int32, device=dev)
    union = torch.empty(bsz, hkv, u_max, dtype=torch.int32, device=dev)
    count = torch.empty(bsz, hkv, dtype=torch.int32, device=dev)
    keys = torch.empty(max(1, bsz * hkv * g * n_tiles * k_pad), dtype=torch.int64, device=dev)

    if n_tiles > 0:
        _gate_tile_kernel[(bsz * hkv * n_tiles,)](
            q, block_means, seq, keys,
            *q.stride(), *block_means.stride(),
            chunk_size, n_tiles,
            HKV=hkv, G=g, GD=gd, D=d, K_PAD=k_pad, NPAST=npast, TILE=tile, NEG=NEG_KEY,
            num_warps=4,
        )
    _gate_merge_kernel[(bsz * hkv,)](
        keys, seq, ids, union, count,
        chunk_size, max(n_tiles, 1), u_max,
        HKV=hkv, G=g, GP=gp, K_PAD=k_pad, NPAST=npast, SLOTS=slots, TILE=tile,
        T2=t2, NEG=NEG_KEY,
        num_warps=8 if gp * max(t2, 4 * k_pad) >= 2048 else 4,  # large groups: keep the tiles in registers
    )

    out, n_split, split_n = _attend(
        q, k_cache, v_cache, seq, ids, union, count, chunk_size, softmax_scale, out,
        block_n=block_n, target_programs=target_programs, num_warps=num_warps, num_stages=num_stages,
    )
    if return_plan:
        plan = {"block_ids": ids, "union": union, "count": count, "n_split": n_split, "split_n": split_n}
        return out, plan
    return out


def _attend(
    q, k_cache, v_cache, seq, ids, union, count, chunk_size, softmax_scale, out,
    *, block_n=None, target_programs=None, num_warps=4, num_stages=None,
):
    """Attention over the planned blocks (``ids [B, Hq, slots]``, ``union [B, Hkv, u_max]``, ``count``)
    and the log-sum-exp combine. Returns ``(out, n_split, split_n)``."""
    bsz, hq, d = q.shape
    hkv = k_cache.shape[2]
    g = hq // hkv
    dev = q.device
    slots, u_max = ids.shape[-1], union.shape[-1]
    gd = max(16, _pow2(g))  # tl.dot wants at least 16 rows
    if block_n is None:
        block_n = 64 if (d > 64 or q.dtype == torch.float32) else 128
    block_n = min(block_n, max(16, _pow2(chunk_size)))
    if target_programs is None:
        target_programs = 8 * _sm_count(dev)
    per_split = bsz * hkv * u_max
    max_split = triton.cdiv(chunk_size, block_n)
    want = min(max_split, max(1, triton.cdiv(target_programs, per_split)))
    split_n = triton.cdiv(triton.cdiv(chunk_size, want), block_n) * block_n
    n_split = triton.cdiv(chunk_size, split_n)

    part_o = torch.empty(bsz * hq * slots * n_split * d, dtype=torch.float32, device=dev)
    part_l = torch.empty(bsz * hq * slots * n_split, dtype=torch.float32, device=dev)
    scale_log2 = softmax_scale * math.log2(math.e)
    extra = {} if num_stages is None else {"num_stages": num_stages}
    _attn_kernel[(bsz * hkv * u_max * n_split,)](
        q, k_cache, v_cache, seq, ids, union, count, part_o, part_l,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        chunk_size, split_n, n_split, u_max, scale_log2,
        HKV=hkv, G=g, GD=gd, D=d, SLOTS=slots, SP=_pow2(slots), BLOCK_N=block_n,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, **extra,
    )
    if out is None:
        out = torch.empty(bsz, hq, d, dtype=q.dtype, device=dev)
    _combine_kernel[(bsz * hq,)](
        part_o, part_l, ids, out,
        *out.stride(),
        n_split,
        HQ=hq, D=d, SLOTS=slots, BLOCK_E=min(32, _pow2(slots * n_split)),
        num_warps=4,
    )
    return out, n_split, split_n


def dense_decode_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    softmax_scale: float, **knobs,
) -> torch.Tensor:
    """Dense decode (every cached key) through the same split-KV kernels: a flash-decoding baseline.

    Same layouts as :func:`moba_decode_triton`; every block is "chosen" by every head, so the result is
    exact dense attention of the last query. Blocks of ``max(4096, L / 64)`` keys keep the plan (and each
    program's per-head block list) small.
    """
    bsz, hq, _ = q.shape
    cache_len, hkv = k_cache.shape[1], k_cache.shape[2]
    chunk = max(4096, _pow2(triton.cdiv(cache_len, 64)))
    nb = triton.cdiv(cache_len, chunk)
    dev = q.device
    seq = cache_seqlens.contiguous()
    blocks = torch.arange(nb, dtype=torch.int32, device=dev)
    live = blocks[None, :] * chunk < seq[:, None]  # [B, NB]
    ids = torch.where(live, blocks, -1)[:, None, :].expand(bsz, hq, nb).contiguous()
    union = blocks.expand(bsz, hkv, nb).contiguous()
    count = ((seq + chunk - 1) // chunk).to(torch.int32)[:, None].expand(bsz, hkv).contiguous()
    out, _, _ = _attend(q, k_cache, v_cache, seq, ids, union, count, chunk, softmax_scale, None, **knobs)
    return out
