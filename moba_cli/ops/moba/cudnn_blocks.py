"""Long blocks: MoBA's forward as dense cuDNN calls, one per key block.

With long blocks (``chunk_size >= KernelOptions.cudnn_min_chunk``; 10M tokens cut into 64 blocks of 163840
keys, say) every part of MoBA's forward is a large dense attention problem:

- own blocks: causal attention inside each block, one batched causal call over a strided
  ``[blocks, H, C, D]`` view of q, k, v (no copy); blocks of 131072 keys or more are halved first (the
  halves causal, the later half on the earlier one in one batched non-causal call);
- past blocks: the queries that chose key block ``j``, gathered into a dense ``[n_j, H, D]`` buffer,
  attend all of block ``j`` without a mask, one non-causal call per block.

cuDNN's fused kernels run this dense work faster than the gathered Triton schedule (H200: ~600 against
~485 TFLOP/s at 10M tokens, docs/perf-notes.md v10). Each call's partial result merges into a float32
accumulator by its log-sum-exp, block after block (the order does not matter: the merge is an exact
online softmax). Blocks that start after a query are never in its list, so no call needs a causal mask
except the own-block one. The backward stays in the sparse kernels, which need only the merged output
and log-sum-exp.

Each head gathers its own choosers: block ``j``'s buffer has ``max_h n_{j,h}`` rows, head ``h`` fills its
first ``n_{j,h}``; the other rows are zeros whose results are never merged. K/V are read in place, grouped
heads (GQA/MQA) as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import LOG2E, empty, is_interp
from .dense import clear_errors, cudnn_ok, reference_fwd
from .layout import BlockLayout
from .options import KernelOptions
from .schedule import PastLists

# Switches and sizes live in KernelOptions: cudnn_blocks, cudnn_min_chunk (below it a block's call is too
# small to pay for its launch, its gather and cuDNN's per-shape plan, and the Triton schedule is as fast:
# H200, v10 probe: +3% at 16384 keys, +6% at 32768, +14% at 65536), own_splits and own_split_min_piece
# (cuDNN's causal kernel runs 163840-key blocks at ~540 TFLOP/s but 81920-key ones at ~600, as fast as its
# non-causal work (H200, sustained, v11 probe). Each split level halves the own blocks: the halves stay
# causal and the later half's queries attend the earlier half's keys in one batched non-causal call,
# merged by log-sum-exp. Shorter halves gain nothing (10M, 163840-key blocks: own part 831 -> 741 ms at
# one level, 739 at two; 65536-key blocks: 117 -> 118 ms)), cudnn_pad_rows and cudnn_tile_rows (below).


@dataclass(frozen=True)
class Plan:
    """A call's host offsets ``cu_host`` (to cut the own-block views) and its ``chunk_size``."""

    cu_host: tuple[int, ...]
    chunk_size: int


def plan(q: torch.Tensor, k: torch.Tensor, cu_host: list[int], chunk_size: int, opts: KernelOptions) -> Plan | None:
    """Whether the forward of packed q ``[T, Hq, D]``, k ``[T, Hkv, D]`` goes through per-block cuDNN
    calls: long blocks, CUDA on Ampere or newer, bf16/fp16, head dim a multiple of 8 up to 128; None
    where it does not apply or ``opts.cudnn_blocks`` is off."""
    if not opts.cudnn_blocks or chunk_size < opts.cudnn_min_chunk:
        return None
    if not (opts.cudnn_reference or cudnn_ok(q, k)):
        return None
    return Plan(cu_host=tuple(cu_host), chunk_size=chunk_size)


# --------------------------------------------------------------------------------------------------
# Row gather and merge


@triton.jit
def _gather_kernel(Q, QG, PAIR_T, OFF, CNT, grp, n,
                   stride_qt, stride_qh, stride_gt, stride_gh,
                   H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row ``r`` of head ``h`` in the buffer ``QG [n, H, D]`` = q of the ``r``-th query of head ``h`` that chose
    this block, zero past that head's count."""
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cnt = tl.load(CNT + grp * H + h)
    off = tl.load(OFF + grp * H + h)
    chosen = rows < cnt
    t = tl.load(PAIR_T + off + rows, mask=chosen, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    x = tl.load(Q + t[:, None] * stride_qt + h * stride_qh + d[None, :], mask=chosen[:, None] & dm[None, :],
                other=0.0)
    tl.store(QG + rows.to(tl.int64)[:, None] * stride_gt + h * stride_gh + d[None, :], x,
             mask=(rows < n)[:, None] & dm[None, :])


@triton.jit
def _lse_merge(a, la, b, lb):
    """Two partial attention results ``a``, ``b`` ``[M, D]`` over disjoint keys, with natural-log
    log-sum-exps ``la``, ``lb`` ``[M]`` -> (their exact combination, its log-sum-exp)."""
    m = tl.maximum(la, lb)
    wa = tl.exp(la - m)
    wb = tl.exp(lb - m)
    s = wa + wb
    return (a * wa[:, None] + b * wb[:, None]) / s[:, None], m + tl.log(s)


@triton.jit
def _merge_kernel(ACC, LSE, PO, PL, PAIR_T, OFF, CNT, grp, row0,
                  stride_at, stride_ah, stride_oh, stride_or, stride_lh, stride_lr,
                  H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Merges one call (rows ``row0 ..`` of a block's choosers: ``PO``, natural-log ``PL``) into their float32
    ``ACC [T, H, D]`` and ``LSE [T, H]``. A (query, head) chooses a block at most once, so no two rows of
    one launch meet."""
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cnt = tl.load(CNT + grp * H + h)
    off = tl.load(OFF + grp * H + h)
    chosen = row0 + rows < cnt
    t = tl.load(PAIR_T + off + row0 + rows, mask=chosen, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    m2 = chosen[:, None] & (d < D)[None, :]
    pa = ACC + t[:, None] * stride_at + h * stride_ah + d[None, :]
    a = tl.load(pa, mask=m2, other=0.0)
    la = tl.load(LSE + t * H + h, mask=chosen, other=0.0)
    b = tl.load(PO + h * stride_oh + rows.to(tl.int64)[:, None] * stride_or + d[None, :], mask=m2,
                other=0.0).to(tl.float32)
    lb = tl.load(PL + h * stride_lh + rows * stride_lr, mask=chosen, other=0.0)
    out, lse = _lse_merge(a, la, b, lb)
    tl.store(pa, out, mask=m2)
    tl.store(LSE + t * H + h, lse, mask=chosen)


@triton.jit
def _merge_dense_kernel(ACC, LSE, PO, PL, n,
                        s_ab, s_ah, s_ar, s_lb, s_lh, s_lr, s_ob, s_oh, s_or, s_pb, s_ph, s_pr,
                        H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Merges a batched call's ``PO [B, H, n, D]``, natural-log ``PL [B, H, n]`` into the float32 views
    ``ACC [B, H, n, D]`` and ``LSE [B, H, n]`` (any strides), row for row."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    live = rows < n
    r64 = rows.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    m2 = live[:, None] & (d < D)[None, :]
    pa = ACC + b * s_ab + h * s_ah + r64[:, None] * s_ar + d[None, :]
    pla = LSE + b * s_lb + h * s_lh + r64 * s_lr
    a = tl.load(pa, mask=m2, other=0.0)
    la = tl.load(pla, mask=live, other=0.0)
    o = tl.load(PO + b * s_ob + h * s_oh + r64[:, None] * s_or + d[None, :], mask=m2, other=0.0).to(tl.float32)
    lb = tl.load(PL + b * s_pb + h * s_ph + r64 * s_pr, mask=live, other=0.0)
    out, lse = _lse_merge(a, la, o, lb)
    tl.store(pa, out, mask=m2)
    tl.store(pla, lse, mask=live)


# --------------------------------------------------------------------------------------------------
# Dense calls


# cuDNN plans every new call shape once (~40 ms on the H200), and the gate's counts change every step:
# exact counts would plan ~60 new shapes per call. Each block's rows are rounded up to a multiple of
# PAD_ROWS and cut into calls of at most TILE_ROWS, so every call has one of 32 row counts, planned in the
# first steps and reused after (H200, 4M tokens, new inputs each call: 644 ms the first time, ~600 after;
# exact counts: 3030-3782 ms every call). The padding rows are zeros whose results are never merged (10M:
# 0.5% more rows). Calls of up to 524288 rows were no faster at 10M (3743 vs 3740 ms).
# TILE_ROWS is a multiple of PAD_ROWS, so a block's last call still holds some of its real rows.
# (PAD_ROWS, TILE_ROWS: KernelOptions.cudnn_pad_rows, cudnn_tile_rows.)


def bucket_rows(n: int, pad: int) -> int:
    """Rows of a block's calls for ``n`` choosers (``n`` rounded up to a multiple of ``pad``)."""
    return -(-n // pad) * pad


def _attend(q4, k4, v4, causal: bool, scale: float, reference: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of ``[B, Hq, S, D]`` queries on ``[B, Hkv, N, D]`` keys (strided views) ->
    (out ``[B, Hq, S, D]`` in q's dtype, natural-log log-sum-exp ``[B, Hq, S]`` float32)."""
    if reference:
        return reference_fwd(q4, k4, v4, scale, causal=causal)
    with clear_errors("the long-block forward's", "MOBA_CUDNN_BLOCKS=0"):
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q4, k4, v4, None, True, 0.0, causal, False, scale=scale
        )
    return res[0], res[1].reshape(q4.shape[:3])


def _own_segments(cu_host: tuple[int, ...], chunk: int) -> list[tuple[int, int, int]]:
    """``(start, n_blocks, block_len)`` runs of equal-length own blocks, contiguous in the packed tokens."""
    lens = [b - a for a, b in zip(cu_host[:-1], cu_host[1:], strict=True)]
    if all(n % chunk == 0 for n in lens):
        return [(cu_host[0], (cu_host[-1] - cu_host[0]) // chunk, chunk)] if cu_host[-1] > cu_host[0] else []
    segs = []
    for a, n in zip(cu_host[:-1], lens, strict=True):
        full, rest = divmod(n, chunk)
        if full:
            segs.append((a, full, chunk))
        if rest:
            segs.append((a + full * chunk, 1, rest))
    return segs


def _blocks_view(x: torch.Tensor, start: int, nb: int, size: int, part: slice = slice(None)) -> torch.Tensor:
    """Tokens ``start .. start + nb*size`` of ``x [T, H, ...]`` as ``[nb, H, size, ...]`` (no copy); ``part``
    keeps those positions of each block."""
    return x[start:start + nb * size].view(nb, size, *x.shape[1:])[:, part].transpose(1, 2)


def _own_blocks(q, k, v, acc, lse, start: int, nb: int, size: int, scale: float, splits: int,
                opts: KernelOptions) -> None:
    """Causal attention inside ``nb`` blocks of ``size`` tokens from ``start``, written to ``acc [T, H, D]``
    and natural-log ``lse [T, H]``. With ``splits`` left and even blocks of at least ``2 * opts.own_split_min_piece``,
    the blocks are halved: each half attends itself causally (recursively), then the later half's queries
    attend the earlier half's keys without a mask, merged by log-sum-exp."""
    if splits <= 0 or size % 2 or size < 2 * opts.own_split_min_piece:
        o, l_ = _attend(*(_blocks_view(x, start, nb, size) for x in (q, k, v)), True, scale, opts.cudnn_reference)
        _blocks_view(acc, start, nb, size).copy_(o)
        _blocks_view(lse, start, nb, size).copy_(l_)
        return
    half = size // 2
    _own_blocks(q, k, v, acc, lse, start, 2 * nb, half, scale, splits - 1, opts)
    late, early = slice(half, None), slice(None, half)
    o, l_ = _attend(_blocks_view(q, start, nb, size, late), _blocks_view(k, start, nb, size, early),
                    _blocks_view(v, start, nb, size, early), False, scale, opts.cudnn_reference)
    o = o if o.stride(3) == 1 else o.contiguous()
    a = _blocks_view(acc, start, nb, size, late)
    la = _blocks_view(lse, start, nb, size, late)
    hq, d = a.shape[1], a.shape[3]
    bm = 16 if is_interp() else 64
    _merge_dense_kernel[(triton.cdiv(half, bm), nb * hq)](
        a, la, o, l_, half, *a.stride()[:3], *la.stride(), *o.stride()[:3], *l_.stride(),
        H=hq, D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=bm)


def _block_ranges(cu_host: tuple[int, ...], chunk: int) -> list[tuple[int, int]]:
    """Key range of every global block, in the layout's numbering, from host offsets (no sync)."""
    out = []
    for a, b in zip(cu_host[:-1], cu_host[1:], strict=True):
        out.extend((s, min(s + chunk, b)) for s in range(a, b, chunk))
    return out


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, block_idx: torch.Tensor,
            scale: float, pl: Plan, opts: KernelOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """MoBA's forward for packed q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` and the gate's ``block_idx
    [T, Hq, S]``. Returns (out ``[T, Hq, D]`` in q's dtype, lse ``[T, Hq]`` float32 in base 2, as the
    Triton kernels keep it)."""
    t_total, hq, d = q.shape
    acc = empty(t_total, hq, d, dtype=torch.float32, device=q.device, poison=opts.poison_outputs)
    lse = empty(t_total, hq, dtype=torch.float32, device=q.device, poison=opts.poison_outputs)
    splits = opts.own_splits
    for start, nb, size in _own_segments(pl.cu_host, pl.chunk_size):
        _own_blocks(q, k, v, acc, lse, start, nb, size, scale, splits, opts)
    if block_idx.shape[2] > 1 and layout.num_blocks:
        lists = PastLists(block_idx, layout.num_blocks)
        pad, tile = opts.cudnn_pad_rows, opts.cudnn_tile_rows
        nmax = bucket_rows(max(lists.rows), pad)
        if nmax:
            buf = torch.empty(nmax * hq * d, dtype=q.dtype, device=q.device)
            ranges = _block_ranges(pl.cu_host, pl.chunk_size)
            bm = 16 if is_interp() else 64
            bd = triton.next_power_of_2(d)
            for j, cnt in enumerate(lists.rows):
                if not cnt:
                    continue
                n = bucket_rows(cnt, pad)
                qg = buf[: n * hq * d].view(n, hq, d)
                _gather_kernel[(triton.cdiv(n, bm), hq)](
                    q, qg, lists.pair_t, lists.group_off, lists.group_cnt, j, n,
                    q.stride(0), q.stride(1), qg.stride(0), qg.stride(1), H=hq, D=d, BLOCK_D=bd, BLOCK_M=bm)
                a, b = ranges[j]
                kv = [x[a:b].transpose(0, 1)[None] for x in (k, v)]
                for r0 in range(0, n, tile):
                    r1 = min(n, r0 + tile)
                    o, l_ = _attend(qg[r0:r1].transpose(0, 1)[None], *kv, False, scale, opts.cudnn_reference)
                    o, l_ = o[0], l_[0]
                    _merge_kernel[(triton.cdiv(r1 - r0, bm), hq)](
                        acc, lse, o, l_, lists.pair_t, lists.group_off, lists.group_cnt, j, r0,
                        acc.stride(0), acc.stride(1), o.stride(0), o.stride(1), l_.stride(0), l_.stride(1),
                        H=hq, D=d, BLOCK_D=bd, BLOCK_M=bm)
                    del o, l_
    return acc.to(q.dtype), lse.mul_(LOG2E)

