"""Public entry points: :func:`moba_attention` and :func:`full_attention`."""

from __future__ import annotations

import torch

from moba_cli.errors import MobaError

from .dense import full_causal
from .options import KernelOptions
from .packing import any_packed, packed_cu_seqlens, sequence_starts
from .plan import CallPlan, plan_call
from .validate import autocast_inputs, check_inputs, check_moba_params, check_position_ids


def _packed(x: torch.Tensor, plan: CallPlan) -> torch.Tensor:
    """``[B, S, H, D]`` as packed ``[B*S, H, D]`` (a view); packed input as it is."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]) if plan.padded else x


def _flat(*xs: torch.Tensor) -> list[torch.Tensor]:
    """``[B, S, H, D]`` tensors as packed ``[B*S, H, D]``."""
    return [x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]) for x in xs]


def moba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_size: int,
    topk: int,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    position_ids: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
    options: KernelOptions | None = None,
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
        position_ids: optional integer ``[B, S]`` (or ``[1, S]``) positions of ``[B, S, H, D]`` input; a row
            packs several sequences where its positions do not step by one (each restarts at its first
            token, as with ``cu_seqlens``). Under ``torch.compile`` this costs no graph break.
        softmax_scale: defaults to ``1/sqrt(D)``.
        backend: ``"naive"`` (float32 reference), ``"triton"`` (kernels), ``"auto"`` (triton on CUDA,
            naive elsewhere).
        options: kernel switches (:class:`KernelOptions`); None reads the ``MOBA_*`` environment. E.g.
            ``KernelOptions(dense_when_full=False)`` runs the sparse kernels even at full coverage.

    Each query scores every complete past block of its sequence by ``q . mean(block keys)`` and keeps the
    ``topk - 1`` best (ties: the earlier block wins), plus its own block. No gradient flows through the
    choice. How the triton backend serves a call (dense shortcut, dense prefix through cuDNN, long blocks
    through cuDNN, sparse kernels) is decided once by :func:`.plan.plan_call`. Under ``torch.autocast``
    the inputs are cast to the autocast dtype first, as SDPA does. Returns a tensor shaped like ``q`` in
    ``q``'s dtype; differentiable in q, k, v.
    """
    q, k, v = autocast_inputs(q, k, v)
    if torch.compiler.is_compiling():
        return _traced_call(q, k, v, cu_seqlens, max_seqlen, position_ids, chunk_size, topk, softmax_scale, backend,
                            options)
    cu_host = check_inputs(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    chunk_size, topk = check_moba_params(chunk_size, topk)
    if position_ids is not None:
        cu = _packed_rows(q, position_ids, cu_seqlens)
        if cu is not None:
            out = moba_attention(*_flat(q, k, v), chunk_size=chunk_size, topk=topk, cu_seqlens=cu,
                                 softmax_scale=softmax_scale, backend=backend, options=options)
            return out.view(q.shape)
    plan = plan_call(q, k, chunk_size=chunk_size, topk=topk, cu_seqlens=cu_seqlens, softmax_scale=softmax_scale,
                     backend=backend, options=options, cu_host=cu_host)
    with torch.autocast(q.device.type, enabled=False):
        return run_plan(plan, q, k, v)


def _packed_rows(q: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor | None:
    """Eager calls with ``position_ids``: the packed rows' offsets, None where each row holds one sequence."""
    check_position_ids(position_ids, q, cu_seqlens)
    return packed_cu_seqlens(position_ids, q.shape[0], q.device)


def _row_starts(q: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Traced calls with ``position_ids``: bool ``[B, S]`` sequence starts. Their shape is fixed whether or
    not a row is packed; the custom ops read the values, so packed rows break no graph."""
    check_position_ids(position_ids, q, cu_seqlens)
    return sequence_starts(position_ids.to(q.device), q.shape[0])


def _traced_call(q, k, v, cu_seqlens, max_seqlen, position_ids, chunk_size, topk, softmax_scale, backend, options):
    """``moba_attention`` inside ``torch.compile``: the checks that need no host sync, then the custom op
    (:mod:`.custom_op`), which reads ``cu_seqlens`` (and the starts of packed rows) itself, so the graph
    does not break here."""
    from .custom_op import attention_fwd, env_dense_when_full, env_options_key
    from .dense import covers_all, dense_causal
    from .options import resolve
    from .validate import resolve_backend

    check_inputs(q, k, v, cu_seqlens, max_seqlen, softmax_scale, values=False)
    starts = None if position_ids is None else _row_starts(q, position_ids, cu_seqlens)
    chunk_size, topk = check_moba_params(chunk_size, topk)
    if options is None:  # the environment, read once at trace time
        key, dense_when_full = env_options_key(), env_dense_when_full()
    else:
        opts = resolve(options)
        key, dense_when_full = opts.key(), opts.dense_when_full
    backend = resolve_backend(backend, q)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    shortcut = False
    if cu_seqlens is None:
        b, s = q.shape[:2]
        shortcut = backend == "triton" and dense_when_full and q.is_cuda and covers_all(s, chunk_size, topk)
        cu_seqlens = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)
        max_seqlen = s
    elif max_seqlen is None:
        max_seqlen = q.shape[0]

    def sparse(q, k, v, cu_seqlens, starts):
        qp, kp, vp = (x.reshape(-1, *x.shape[-2:]) for x in (q, k, v))
        flat = None if starts is None else starts.flatten()
        with torch.autocast(q.device.type, enabled=False):
            out, _, _ = attention_fwd(qp, kp, vp, cu_seqlens, chunk_size, topk, scale, max_seqlen, backend, key, flat)
        return out.view(q.shape)

    def dense(q, k, v, cu_seqlens, starts):
        return dense_causal(q, k, v, None, scale)

    if not shortcut:
        return sparse(q, k, v, cu_seqlens, starts)
    if starts is None:
        return dense(q, k, v, cu_seqlens, starts)
    # Whether a row packs several sequences is known only at run time (one dense call per row would attend
    # across them), so both ways stay in the graph; packed rows take the sparse kernels, same result.
    return torch.cond(any_packed(starts), sparse, dense, (q, k, v, cu_seqlens, starts))


def run_plan(plan: CallPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Execute ``plan`` (from :func:`plan_call` on these inputs). Returns a tensor shaped like ``q``."""
    if plan.path == "dense":
        from .dense import dense_causal

        return dense_causal(q, k, v, None if plan.padded else list(plan.cu_host), plan.scale)
    qp, kp, vp = _packed(q, plan), _packed(k, plan), _packed(v, plan)
    layout = plan.layout()
    if plan.backend == "naive":
        from .naive import moba_attention_naive

        out, _ = moba_attention_naive(qp, kp, vp, layout, plan.topk, plan.scale)
        out = out.to(q.dtype)
    else:
        from .function import moba_triton

        out = moba_triton(qp, kp, vp, layout, plan.topk, plan.scale, plan.options, plan.prefix, plan.blocks)
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
    position_ids: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Dense causal attention with :func:`moba_attention`'s signature, for comparisons.

    ``chunk_size`` and ``topk`` are accepted and ignored so the two functions can be swapped; packed
    sequences come as ``cu_seqlens`` or ``position_ids`` as there (under ``torch.compile``, rows with
    ``position_ids`` go through one custom op, ``moba::full_fwd``, whose backward runs SDPA again). Backends:
    ``"naive"`` computes in float32 one sequence at a time; ``"auto"``/``"sdpa"`` use torch SDPA in the
    inputs' dtype (whatever kernel PyTorch picks). Returns a tensor shaped like ``q`` in ``q``'s dtype.
    Under ``torch.autocast`` the inputs are cast to the autocast dtype first, as SDPA does.
    """
    q, k, v = autocast_inputs(q, k, v)
    cu_host = check_inputs(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    if backend not in ("auto", "naive", "sdpa", "triton"):
        raise MobaError(f"unknown backend {backend!r} for full_attention; choose auto, naive or sdpa")
    if position_ids is not None and torch.compiler.is_compiling():
        from .custom_op import full_fwd

        starts = _row_starts(q, position_ids, cu_seqlens).flatten()
        with torch.autocast(q.device.type, enabled=False):
            return full_fwd(q, k, v, starts, None if softmax_scale is None else float(softmax_scale), backend)
    if position_ids is not None:
        cu = _packed_rows(q, position_ids, cu_seqlens)
        if cu is not None:
            flat = _flat(q, k, v)
            return full_attention(*flat, cu_seqlens=cu, softmax_scale=softmax_scale, backend=backend).view(q.shape)
    return full_causal(q, k, v, cu_host, softmax_scale, backend)
