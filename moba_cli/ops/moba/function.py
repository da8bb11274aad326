"""The autograd function around the Triton kernels, and the pipeline they make.

Pipeline, all on the packed layout (q ``[T, Hq, D]``, k/v ``[T, Hkv, D]``, see :mod:`.layout`):

1. Block means (:mod:`.gate`): float32 mean key of every block, ``[NB, Hkv, D]``.
2. Gate (:mod:`.gate`): each (query, head) scores its sequence's complete past blocks and keeps the best
   ``topk - 1`` with a streaming top-k, so the ``[T, NB]`` score matrix is never written. Output
   ``block_idx [T, Hq, slots]`` as in :mod:`.naive`.
3. Schedule (:mod:`.schedule`, torch): the (query, head, slot) pairs are sorted by (slot, head, block),
   so every key block gets a dense list of the queries that chose it ("gather and densify").
4. Forward (:mod:`.fwd`): one program per tile of gathered queries of one (slot, head, block), merged
   slot by slot by log-sum-exp into a partial result kept in the output's own memory; the own-block slot
   runs last and writes the output. Without a gradient, steps 2-4 run slot by slot and in pieces of heads
   and rows (:mod:`.fwd_pieces`), so their buffers stay small beside the output.
5. Backward (:mod:`.bwd`, :mod:`.gluon_bwd` on Hopper): per key tile, every query that chose its block;
   dQ by atomics (fused) or by its own pass.

With a dense prefix (:mod:`.dense_prefix`: the first ``topk`` blocks of equal-length sequences, where
every past block is kept), those queries are left out of steps 3-5 and run through cuDNN instead. With
long blocks (:mod:`.cudnn_blocks`) the whole forward (steps 3-4) is dense cuDNN calls, one per key block,
and the backward stays in step 5. Which of these applies is the call's :class:`~.plan.CallPlan`.
"""

from __future__ import annotations

import torch

from . import cudnn_blocks, dense_prefix
from .bwd import backward, bwd_config
from .common import contig_last, empty
from .fwd import forward, fwd_config, run_with_prefix
from .fwd_pieces import forward_in_pieces
from .gate import select_blocks
from .layout import BlockLayout
from .options import KernelOptions
from .schedule import BwdLists, Schedule


def run_forward(q, k, v, layout: BlockLayout, topk: int, scale: float, opts: KernelOptions,
                prefix: dense_prefix.Prefix | None, blocks: cudnn_blocks.Plan | None, need_lse: bool,
                inference: bool = False):
    """Steps 1-4 of one call: the gate, then the forward of the plan's kind (long blocks through cuDNN, or
    the sparse kernels with the dense prefix's rows through cuDNN). Returns ``(out, lse, block_idx, sched,
    skip, prefix_state)``: ``sched`` the forward's schedule (None for long blocks; its ``block_idx``
    released), ``skip [T]`` the dense prefix's tokens (None without one), ``prefix_state`` what
    :func:`.dense_prefix.backward` needs (``need_lse``: keep cuDNN's log-sum-exp). ``inference``: no
    backward follows and ``KernelOptions.fwd_lean`` asks for the least memory: the sparse forward builds its
    block lists and schedules slot by slot and in pieces (:mod:`.fwd_pieces`); ``block_idx``/``sched`` come
    back None."""
    if blocks is not None:
        # the long-block forward does the prefix's work in its own calls
        block_idx = select_blocks(q, k, layout, topk, opts)
        out, lse = cudnn_blocks.forward(q, k, v, layout, block_idx, scale, blocks, opts)
        return out, lse, block_idx, None, None, None
    # Dense-prefix queries (their first topk blocks) are block rank < topk within their sequence.
    skip = None if prefix is None else (layout.token_block - layout.token_first_block) < topk
    bm = fwd_config(q.shape[-1], q.dtype, layout.chunk_size, opts.fwd_cfg)["BLOCK_M"]
    block_idx = sched = None
    if inference:

        def sparse(o):
            return forward_in_pieces(q, k, v, layout, topk, scale, skip, bm, o, opts)
    else:
        block_idx = select_blocks(q, k, layout, topk, opts)
        sched = Schedule(block_idx, layout.num_blocks, bm, skip)

        def sparse(o):
            return forward(q, k, v, layout, sched, scale, opts, o)[1]
    out = empty(*q.shape, dtype=q.dtype, device=q.device, poison=opts.poison_outputs)
    state = None
    if prefix is None:
        lse = sparse(out)
    else:
        heads = None
        if inference and not need_lse:
            heads = dense_prefix.piece_heads(prefix, q.shape[1], k.shape[1], opts.fwd_piece_budget)
        lse, state = run_with_prefix(q, k, v, out, prefix, scale, need_lse, opts, sparse, heads)
    if sched is not None:
        sched.block_idx = None  # the backward does not need it; do not keep [T, H, S] alive until then
    return out, lse, block_idx, sched, skip, state


class MobaFunction(torch.autograd.Function):
    """Autograd wrapper: forward runs the gate and the sparse attention; backward reuses the schedule."""

    @staticmethod
    def forward(ctx, q, k, v, layout: BlockLayout, topk: int, scale: float, prefix: dense_prefix.Prefix | None,
                blocks: cudnn_blocks.Plan | None, opts: KernelOptions):
        need_grad = any(ctx.needs_input_grad[:3])
        if blocks is not None:
            prefix = None
        out, lse, block_idx, sched, skip, state = run_forward(q, k, v, layout, topk, scale, opts, prefix, blocks,
                                                              need_grad, inference=not need_grad and opts.fwd_lean)
        if need_grad:
            # The backward path is decided once here, so the schedule kept for it always fits.
            fused = opts.bwd_fused
            bm_b = bwd_config(q.shape[-1], q.dtype, fused, opts.bwd_cfg)["BLOCK_M"]
            lists = BwdLists(block_idx, layout.num_blocks, skip)
            # The separate dQ pass (not fused) walks tiles like the forward's, of the backward's size.
            dq_sched = None
            if not fused:
                dq_sched = sched if sched is not None and bm_b == sched.block_m else Schedule(
                    block_idx, layout.num_blocks, bm_b, skip)
                dq_sched.block_idx = None
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.lists, ctx.dq_sched, ctx.layout, ctx.scale, ctx.fused = lists, dq_sched, layout, scale, fused
            ctx.opts = opts
            ctx.prefix, ctx.prefix_state = prefix, state
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        if ctx.prefix is not None and not dout.is_contiguous():
            dout = dout.contiguous()  # cuDNN's backward takes dO in the layout of the saved output
        dq, dk, dv = backward(q, k, v, out, dout, lse, ctx.layout, ctx.lists, ctx.dq_sched, ctx.scale, ctx.fused,
                              ctx.opts)
        if ctx.prefix is not None:
            # After the sparse part, whose float32 dQ buffer is freed by now: the dense part's gradients
            # then fit in that memory and the peak does not grow.
            dense_prefix.backward(dout, q, k, v, out, dq, dk, dv, ctx.prefix, ctx.scale, ctx.prefix_state,
                                  ctx.opts.cudnn_reference)
        return dq, dk, dv, None, None, None, None, None, None


def moba_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, topk: int, scale: float,
                opts: KernelOptions, prefix: dense_prefix.Prefix | None = None,
                blocks: cudnn_blocks.Plan | None = None) -> torch.Tensor:
    """MoBA with the Triton kernels. q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` -> ``[T, Hq, D]``, differentiable.

    ``prefix`` (:func:`.dense_prefix.plan`) runs those rows through cuDNN; ``blocks``
    (:func:`.cudnn_blocks.plan`) runs the forward as per-block cuDNN calls (then ``prefix`` is not used).
    """
    q, k, v = contig_last(q), contig_last(k), contig_last(v)
    return MobaFunction.apply(q, k, v, layout, topk, float(scale), prefix, blocks, opts)
