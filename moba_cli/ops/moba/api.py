"""Public entry points: :func:`moba_attention` and :func:`full_attention`."""

from __future__ import annotations

import torch

from .layout import cached_layout, make_layout
from .validate import check_inputs, check_moba_params, resolve_backend


def _pack(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """Return packed ``[T, H, D]`` views and cu_seqlens; a padded batch becomes equal-length sequences."""
    if cu_seqlens is not None:
        return q, k, v, cu_seqlens
    b, s = q.shape[:2]
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)
    return q.reshape(b * s, *q.shape[2:]), k.reshape(b * s, *k.shape[2:]), v.reshape(b * s, *v.shape[2:]), cu


def moba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_size: int,
    topk: int,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Mixture of Block Attention (MoBA), causal.

    Args:
        q: ``[B, S, Hq, D]``, or packed ``[T, Hq, D]`` together with ``cu_seqlens``.
        k, v: ``[B, S, Hkv, D]`` or ``[T, Hkv, D]``; ``Hq`` must be a multiple of ``Hkv`` (MHA, GQA,
            MQA). K/V are read in place by every query head of their group, never repeated.
        chunk_size: keys per block; blocks restart at the start of every sequence.
        topk: blocks each query attends, counting its own block (always taken, attended causally).
            ``topk=1`` is own-block attention; ``topk >=`` the number of blocks is full causal attention.
        cu_seqlens: int32 ``[n+1]`` sequence offsets for packed variable-length input.
        max_seqlen: optional, checked against ``cu_seqlens`` (accepted for flash-attn compatibility).
        softmax_scale: defaults to ``1/sqrt(D)``.
        backend: ``"naive"`` (float32 reference), ``"triton"`` (kernels), ``"auto"`` (triton on CUDA,
            naive elsewhere).

    Each query scores every complete past block of its sequence by ``q . mean(block keys)`` and keeps
    the ``topk - 1`` best (ties: the earlier block wins), plus its own block. No gradient flows through
    the choice. On CUDA, the first ``topk`` blocks of equal-length sequences (dense causal attention, as
    every past block is kept there) run through cuDNN's dense kernel (:mod:`.dense_prefix`); with blocks
    of 32768 keys or more the whole forward is cuDNN calls, one per key block (:mod:`.cudnn_blocks`).
    Returns a tensor shaped like ``q`` in ``q``'s dtype; differentiable in q, k, v.
    """
    check_inputs(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    check_moba_params(chunk_size, topk)
    backend = resolve_backend(backend, q)
    if backend == "triton":
        from . import cudnn_blocks, dense_prefix, triton_moba

        # With top-k covering every block MoBA is dense causal attention: hand it to PyTorch's fused
        # kernel before any block bookkeeping (no layout, no host syncs), so full coverage costs nothing.
        cu_host = None if cu_seqlens is None else cu_seqlens.tolist()
        longest = q.shape[1] if cu_host is None else max(b - a for a, b in zip(cu_host[:-1], cu_host[1:], strict=True))
        if triton_moba.DENSE_WHEN_FULL and q.is_cuda and triton_moba.covers_all(longest, chunk_size, topk):
            scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
            return triton_moba._dense_causal(q, k, v, cu_host, float(scale))
        # The layout comes from host offsets (the padded shape, or the list read above), so it is built
        # without waiting for the GPU, or found in the cache.
        qp, kp, vp = q, k, v
        if cu_host is None:
            b, s = q.shape[:2]
            cu_host = [i * s for i in range(b + 1)]
            qp, kp, vp = (x.reshape(b * s, *x.shape[2:]) for x in (q, k, v))
        layout = cached_layout(cu_host, chunk_size, q.device)
        blocks = cudnn_blocks.plan(qp, kp, cu_host, chunk_size)
        prefix = None if blocks is not None else dense_prefix.plan(qp, kp, cu_host, chunk_size, topk)
    else:
        qp, kp, vp, cu = _pack(q, k, v, cu_seqlens)
        layout = make_layout(cu, chunk_size)
    if backend == "naive":
        from .naive import moba_attention_naive

        out, _ = moba_attention_naive(qp, kp, vp, layout, topk, softmax_scale)
        out = out.to(q.dtype)
    else:
        from .triton_moba import moba_attention_triton

        out = moba_attention_triton(qp, kp, vp, layout, topk, softmax_scale, prefix, blocks)
    return out.view(q.shape)


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_size: int | None = None,
    topk: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Dense causal attention with :func:`moba_attention`'s signature, for comparisons.

    ``chunk_size`` and ``topk`` are accepted and ignored so the two functions can be swapped. Backends:
    ``"naive"`` computes in float32 one sequence at a time; ``"auto"``/``"sdpa"`` use torch SDPA in the
    inputs' dtype (whatever kernel PyTorch picks). Returns a tensor shaped like ``q`` in ``q``'s dtype.
    """
    check_inputs(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    if backend not in ("auto", "naive", "sdpa", "triton"):
        from moba_cli.errors import MobaError

        raise MobaError(f"unknown backend {backend!r} for full_attention; choose auto, naive or sdpa")
    if backend == "naive":
        from .naive import full_attention_naive

        qp, kp, vp, cu = _pack(q, k, v, cu_seqlens)
        return full_attention_naive(qp, kp, vp, cu, softmax_scale).to(q.dtype).view(q.shape)
    hq, hkv = q.shape[-2], k.shape[-2]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if cu_seqlens is None:
        o = sdpa(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, scale=softmax_scale, enable_gqa=hq != hkv,
        )
        return o.transpose(1, 2).contiguous()
    out = torch.empty_like(q)
    cu = cu_seqlens.tolist()
    for s0, s1 in zip(cu[:-1], cu[1:], strict=True):
        if s1 > s0:
            qs, ks, vs = (x[s0:s1].transpose(0, 1)[None] for x in (q, k, v))
            out[s0:s1] = sdpa(qs, ks, vs, is_causal=True, scale=softmax_scale, enable_gqa=hq != hkv)[0].transpose(0, 1)
    return out
