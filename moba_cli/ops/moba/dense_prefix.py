"""The dense prefix of MoBA: the first ``topk`` blocks of every sequence.

A query in block ``i < topk`` of its sequence has at most ``i <= topk - 1`` past blocks, so the gate keeps
all of them: its attention is plain causal attention over the sequence so far. The first
``P = topk * chunk_size`` queries of a sequence therefore compute dense causal attention over its first
``P`` keys, exactly. :class:`~.function.MobaFunction` leaves those queries out of its block-sparse
schedule and runs them through cuDNN's fused dense kernel instead, which does dense work faster than a
gathered schedule (H200, docs/perf-notes.md v9). The keys of the prefix are still read by later queries
through the sparse kernels: their dK/dV are the sum of both parts.

Only for batches of equal-length sequences (a padded batch, or packed sequences of one length), where
the prefixes form one ``[B, H, P, D]`` strided view and one cuDNN call covers them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dense import clear_errors, cudnn_ok, reference_bwd, reference_fwd
from .options import KernelOptions


@dataclass(frozen=True)
class Prefix:
    """``batch`` sequences of ``seqlen`` tokens each, packed; the first ``rows`` of each are dense."""

    batch: int
    seqlen: int
    rows: int


def plan(q: torch.Tensor, k: torch.Tensor, cu_host: list[int], chunk_size: int, topk: int,
         opts: KernelOptions) -> Prefix | None:
    """The dense prefix of a call on packed q ``[T, Hq, D]``, k ``[T, Hkv, D]`` with host offsets
    ``cu_host``, or None where it does not apply (or ``opts.dense_prefix`` is off)."""
    if not opts.dense_prefix:
        return None
    lens = {b - a for a, b in zip(cu_host[:-1], cu_host[1:], strict=True)}
    if len(lens) != 1:
        return None
    seqlen = lens.pop()
    rows = topk * chunk_size
    if rows >= seqlen or rows < opts.dense_prefix_min_rows:
        return None
    if not (opts.cudnn_reference or cudnn_ok(q, k)):
        return None
    return Prefix(batch=len(cu_host) - 1, seqlen=seqlen, rows=rows)


def view(x: torch.Tensor, pre: Prefix) -> torch.Tensor:
    """The prefix rows of packed ``x [T, H, D]`` as a strided ``[B, H, P, D]`` view (no copy)."""
    return x.view(pre.batch, pre.seqlen, *x.shape[1:])[:, : pre.rows].transpose(1, 2)


def piece_heads(pre: Prefix, hq: int, hkv: int, budget: float) -> int:
    """Query heads per cuDNN call of an inference prefix: each call's output is a new tensor before it is
    copied into ``out``, so its ``P/seqlen * heads/hq`` share of the output's bytes stays under ``budget``
    where heads can be split (a multiple of the GQA group that divides ``hq``, or a divisor of the group).
    ``budget <= 0``: all heads in one call."""
    if budget <= 0:
        return hq
    share = pre.rows / pre.seqlen
    g = hq // hkv
    fits = [h for h in range(1, hq + 1) if hq % h == 0 and (h % g == 0 or g % h == 0)]
    return max([h for h in fits if share * h / hq <= budget] or [1])


def forward(q, k, v, out, pre: Prefix, scale: float, need_lse: bool, reference: bool = False,
            heads: int | None = None) -> tuple:
    """Dense causal attention of the prefix rows, written into ``out``'s prefix rows. Returns what
    :func:`backward` needs (cuDNN's natural-log log-sum-exp first, then its bookkeeping). ``reference``:
    float32 torch attention in place of cuDNN (CPU tests). ``heads`` (inference only, ``need_lse`` off):
    query heads per call (:func:`piece_heads`), so only that share of the prefix's output exists twice."""
    hq, hkv = q.shape[1], k.shape[1]
    if heads is not None and heads < hq:
        if need_lse:
            raise ValueError("a dense prefix in head pieces keeps no state for a backward")
        g = hq // hkv
        for h0 in range(0, hq, heads):
            kvs = slice(h0 // g, (h0 + heads) // g) if heads >= g else slice(h0 // g, h0 // g + 1)
            forward(q[:, h0:h0 + heads], k[:, kvs], v[:, kvs], out[:, h0:h0 + heads], pre, scale, False, reference)
        return ()
    qv, kv, vv = view(q, pre), view(k, pre), view(v, pre)
    if not reference:
        with clear_errors():
            res = torch.ops.aten._scaled_dot_product_cudnn_attention(
                qv, kv, vv, None, need_lse, 0.0, True, False, scale=scale
            )
        od, state = res[0], tuple(res[1:8])
    else:
        od, lse = reference_fwd(qv, kv, vv, scale)
        state = (lse,)
    view(out, pre).copy_(od)
    return state


def backward(dout, q, k, v, out, dq, dk, dv, pre: Prefix, scale: float, state: tuple, reference: bool = False) -> None:
    """Adds the prefix rows' gradients: dQ of those rows is theirs alone (the sparse part left them out),
    dK/dV of the prefix keys add to what later queries gave them."""
    args = [view(x, pre) for x in (dout, q, k, v, out)]
    if not reference:
        lse, cu_q, cu_k, max_q, max_k, seed, offset = state
        with clear_errors():
            dqd, dkd, dvd = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                *args, lse, seed, offset, None, cu_q, cu_k, max_q, max_k, 0.0, True, scale=scale
            )
    else:
        dqd, dkd, dvd = reference_bwd(*args, state[0], scale)
    view(dq, pre).copy_(dqd)
    view(dk, pre).add_(dkd)
    view(dv, pre).add_(dvd)
