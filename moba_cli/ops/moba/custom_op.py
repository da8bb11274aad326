"""MoBA as ``torch.library`` custom ops, so ``torch.compile`` keeps a model's attention in its graph.

``moba::attention_fwd`` and ``moba::attention_bwd`` take only tensors and plain scalars (the host plan is
rebuilt inside from ``cu_seqlens``, split further at the optional per-token ``starts`` of rows packing
several sequences, see :mod:`.packing`; kernel options travel as :meth:`KernelOptions.key`), have fake
(meta) implementations for tracing, and are tied together with ``register_autograd``. Eager calls keep
:class:`~.function.MobaFunction` (its backward reuses the forward's schedule); a compiled graph calls these
ops, whose backward rebuilds its work lists from the saved selection ``block_idx``. Both compute the same
thing: the dense prefix's rows are handed to the sparse backward here (their log-sum-exp is kept), and the
long-block forward's backward is the sparse one anyway.

``moba::full_fwd`` / ``moba::full_bwd`` serve :func:`~.api.full_attention` with ``position_ids`` in a traced
graph the same way: the packed offsets are read inside; the backward runs the forward again to take
SDPA's backward (SDPA keeps no state the op could return).
"""

from __future__ import annotations

import torch

from moba_cli.errors import MobaError

from .bwd import backward, bwd_config
from .common import LOG2E, contig_last
from .dense import full_causal
from .function import run_forward
from .layout import num_slots
from .options import KernelOptions, from_key
from .packing import split_cu_seqlens
from .plan import CallPlan, plan_call
from .schedule import BwdLists, Schedule
from .validate import check_cu_seqlens


@torch.compiler.assume_constant_result
def env_options_key() -> str:
    """:meth:`KernelOptions.from_env` as its key, read once while a graph is traced (a constant in it)."""
    return KernelOptions.from_env().key()


@torch.compiler.assume_constant_result
def env_dense_when_full() -> bool:
    return KernelOptions.from_env().dense_when_full


def op_slots(topk: int, max_seqlen: int, chunk_size: int) -> int:
    """Slots of the op's ``block_idx``: a bound known from shapes (the actual count can be lower; the
    rest are ``-1``), so the fake implementation can size it without reading ``cu_seqlens``."""
    return num_slots(topk, -(-max_seqlen // chunk_size))


def _pad_slots(block_idx: torch.Tensor, slots: int) -> torch.Tensor:
    if block_idx.shape[2] == slots:
        return block_idx
    pad = block_idx.new_full((*block_idx.shape[:2], slots - block_idx.shape[2]), -1)
    return torch.cat([block_idx, pad], 2)


def _split(cu_seqlens: torch.Tensor, starts: torch.Tensor | None, total: int) -> torch.Tensor:
    """``cu_seqlens`` split at the packed rows' ``starts`` (bool ``[T]``), read here, outside the graph."""
    if starts is None:
        return cu_seqlens
    if starts.dtype != torch.bool or tuple(starts.shape) != (total,):
        raise MobaError(f"starts must be bool [{total}] (one flag per token), got {starts.dtype} {tuple(starts.shape)}")
    return split_cu_seqlens(cu_seqlens, starts.to(cu_seqlens.device))


def _plan(q, k, cu_seqlens, starts, chunk_size, topk, scale, max_seqlen, backend, options):
    """The call's plan, from ``cu_seqlens`` (split at ``starts``) read here (checked first). The dense
    shortcut is off: the op's backward needs the selection, and the traced caller takes the shortcut
    itself where it applies."""
    cu_seqlens = _split(cu_seqlens, starts, q.shape[0])
    cu_host = check_cu_seqlens(cu_seqlens, q.shape[0], q.device, max_seqlen)
    opts = from_key(options).replace(dense_when_full=False)
    return plan_call(q, k, chunk_size=chunk_size, topk=topk, cu_seqlens=cu_seqlens, softmax_scale=scale,
                     backend=backend, options=opts, cu_host=cu_host)


def _naive_forward(q, k, v, plan: CallPlan):
    from .naive import moba_attention_naive
    from .naive import select_blocks as select_ref

    layout = plan.layout()
    block_idx = select_ref(q, k, layout, plan.topk)
    out, lse = moba_attention_naive(q, k, v, layout, plan.topk, plan.scale, block_idx=block_idx)
    return out.to(q.dtype), lse, block_idx


def _triton_forward(q, k, v, plan: CallPlan):
    """The eager function's forward (:func:`.function.run_forward`); the lse (base 2) covers every row."""
    prefix = plan.prefix if plan.blocks is None else None
    out, lse, block_idx, _, _, state = run_forward(q, k, v, plan.layout(), plan.topk, plan.scale, plan.options,
                                                   prefix, plan.blocks, True)
    if prefix is not None:
        # the prefix rows' natural-log lse from the dense call, in the kernels' base 2
        rows = lse.view(prefix.batch, prefix.seqlen, -1)[:, : prefix.rows]
        rows.copy_(state[0].reshape(prefix.batch, -1, prefix.rows).transpose(1, 2) * LOG2E)
    return out, lse, block_idx


@torch.library.custom_op("moba::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, chunk_size: int,
                  topk: int, scale: float, max_seqlen: int, backend: str,
                  options: str, starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` -> (out ``[T, Hq, D]`` in q's dtype, log-sum-exp
    ``[T, Hq]`` float32 (read by the backward only), ``block_idx [T, Hq, op_slots]`` int32).
    ``starts``: optional bool ``[T]``, more sequence starts inside those of ``cu_seqlens``."""
    q, k, v = contig_last(q), contig_last(k), contig_last(v)
    plan = _plan(q, k, cu_seqlens, starts, chunk_size, topk, scale, max_seqlen, backend, options)
    run = _naive_forward if plan.backend == "naive" else _triton_forward
    out, lse, idx = run(q, k, v, plan)
    return out, lse, _pad_slots(idx, op_slots(topk, max_seqlen, chunk_size))


@attention_fwd.register_fake
def _(q, k, v, cu_seqlens, chunk_size, topk, scale, max_seqlen, backend, options, starts=None):
    t, hq = q.shape[:2]
    slots = op_slots(topk, max_seqlen, chunk_size)
    return (q.new_empty(q.shape), q.new_empty(t, hq, dtype=torch.float32),
            q.new_empty(t, hq, slots, dtype=torch.int32))


@torch.library.custom_op("moba::attention_bwd", mutates_args=())
def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, block_idx: torch.Tensor, cu_seqlens: torch.Tensor, chunk_size: int, topk: int,
                  scale: float, max_seqlen: int, backend: str,
                  options: str, starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of :func:`attention_fwd` (shapes and dtypes of q, k, v) for the incoming ``dout``."""
    q, k, v = contig_last(q), contig_last(k), contig_last(v)
    plan = _plan(q, k, cu_seqlens, starts, chunk_size, topk, scale, max_seqlen, backend, options)
    layout = plan.layout()
    if plan.backend == "naive":
        from .naive import moba_attention_naive_bwd

        grads = moba_attention_naive_bwd(dout, q, k, v, layout, block_idx, scale)
        return tuple(gr.to(x.dtype) for gr, x in zip(grads, (q, k, v), strict=True))
    opts = plan.options
    fused = opts.bwd_fused
    lists = BwdLists(block_idx, layout.num_blocks)
    sched = None
    if not fused:
        bm = bwd_config(q.shape[-1], q.dtype, fused, opts.bwd_cfg)["BLOCK_M"]
        sched = Schedule(block_idx, layout.num_blocks, bm)
        sched.block_idx = None
    return backward(q, k, v, out, dout, lse, layout, lists, sched, scale, fused, opts)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, block_idx, cu_seqlens, chunk_size, topk, scale, max_seqlen, backend, options,
      starts=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, chunk_size, topk, scale, max_seqlen, backend, options, starts = inputs
    out, lse, block_idx = output
    ctx.save_for_backward(q, k, v, out, lse, block_idx, cu_seqlens, starts)
    ctx.args = (chunk_size, topk, scale, max_seqlen, backend, options)


def _backward(ctx, dout, dlse, didx):
    q, k, v, out, lse, block_idx, cu_seqlens, starts = ctx.saved_tensors
    dq, dk, dv = torch.ops.moba.attention_bwd(dout, q, k, v, out, lse, block_idx, cu_seqlens, *ctx.args, starts)
    return dq, dk, dv, None, None, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _full(q, k, v, starts, scale, backend):
    """Dense causal attention of ``[B, S, H, D]`` rows, each split at its ``starts`` (bool ``[B*S]``)."""
    b, s = q.shape[:2]
    rows = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)
    cu = _split(rows, starts, b * s)
    if cu.numel() == b + 1:  # one sequence per row: the batched call
        return full_causal(q, k, v, None, scale, backend)
    flat = [x.reshape(b * s, *x.shape[2:]) for x in (q, k, v)]
    return full_causal(*flat, cu.tolist(), scale, backend).view(q.shape)


@torch.library.custom_op("moba::full_fwd", mutates_args=())
def full_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, scale: float | None,
             backend: str) -> torch.Tensor:
    """q ``[B, S, Hq, D]``, k/v ``[B, S, Hkv, D]`` -> dense causal attention (q's shape and dtype) of the
    sequences that ``starts`` (bool ``[B*S]``) packs along the rows; ``backend`` as :func:`.dense.full_causal`."""
    return _full(q, k, v, starts, scale, backend)


@full_fwd.register_fake
def _(q, k, v, starts, scale, backend):
    return q.new_empty(q.shape)


@torch.library.custom_op("moba::full_bwd", mutates_args=())
def full_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor,
             scale: float | None, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of :func:`full_fwd`: its forward again, then SDPA's own backward. ``torch.func.vjp``, as
    a custom op's implementation runs below autograd (``torch.autograd.grad`` would see no graph)."""
    _, vjp = torch.func.vjp(lambda q_, k_, v_: _full(q_, k_, v_, starts, scale, backend), q, k, v)
    dq, dk, dv = vjp(dout)
    return dq, dk, dv


@full_bwd.register_fake
def _(dout, q, k, v, starts, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _full_setup_context(ctx, inputs, output):
    q, k, v, starts, scale, backend = inputs
    ctx.save_for_backward(q, k, v, starts)
    ctx.args = (scale, backend)


def _full_backward(ctx, dout):
    q, k, v, starts = ctx.saved_tensors
    dq, dk, dv = torch.ops.moba.full_bwd(dout, q, k, v, starts, *ctx.args)
    return dq, dk, dv, None, None, None


full_fwd.register_autograd(_full_backward, setup_context=_full_setup_context)
