"""How one MoBA prefill call is served, decided once: :func:`plan_call` returns a :class:`CallPlan` that
:mod:`.api` executes and that the bench and ``moba compare`` read to say what ran.

Paths (``CallPlan.path``), checked in this order for the triton backend:

- ``"dense"``: top-k covers every block of the longest sequence, on CUDA (``options.dense_when_full``):
  MoBA is then dense causal attention and SDPA (cuDNN first) runs it, with no block bookkeeping.
- ``"long_blocks"``: ``chunk_size >= options.cudnn_min_chunk`` where cuDNN applies: the forward is dense
  cuDNN calls, one per key block (:mod:`.cudnn_blocks`); the backward is the sparse kernels'.
- ``"dense_prefix"``: equal-length sequences whose first ``topk`` blocks hold at least
  ``options.dense_prefix_min_rows`` queries: those rows run through cuDNN (:mod:`.dense_prefix`), the
  rest in the sparse kernels.
- ``"sparse"``: the gate and the block-sparse Triton kernels for every query (:mod:`.function`).

The naive backend has one path, ``"naive"`` (the float32 reference). Decode has its own entry point
(:func:`.decode.moba_decode`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .dense import covers_all
from .layout import BlockLayout, cached_layout
from .options import KernelOptions, resolve
from .validate import resolve_backend

if TYPE_CHECKING:
    from . import cudnn_blocks, dense_prefix

PATHS = ("naive", "dense", "long_blocks", "dense_prefix", "sparse")


@dataclass(frozen=True)
class CallPlan:
    """One call's serving decision and the host-side facts its stages need."""

    backend: str
    """``"naive"`` or ``"triton"`` (``"auto"`` resolved)."""
    path: str
    """One of :data:`PATHS`."""
    cu_host: tuple[int, ...]
    """Sequence offsets ``[n+1]`` on the host (a padded batch ``[B, S]`` gives ``0, S, 2S, ...``)."""
    padded: bool
    """Inputs were ``[B, S, H, D]`` (no ``cu_seqlens``)."""
    longest: int
    """Tokens in the longest sequence."""
    chunk_size: int
    topk: int
    scale: float
    """Softmax scale (``1/sqrt(D)`` unless given)."""
    device: torch.device
    options: KernelOptions
    prefix: dense_prefix.Prefix | None = None
    """The dense prefix (path ``"dense_prefix"``)."""
    blocks: cudnn_blocks.Plan | None = None
    """The long-block forward's plan (path ``"long_blocks"``)."""

    def layout(self) -> BlockLayout:
        """The block layout of :attr:`cu_host` (cached; built without waiting for the GPU)."""
        return cached_layout(list(self.cu_host), self.chunk_size, self.device)


def plan_call(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    chunk_size: int,
    topk: int,
    cu_seqlens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
    options: KernelOptions | None = None,
    cu_host: list[int] | None = None,
) -> CallPlan:
    """Decide how ``moba_attention(q, k, v, ...)`` with these arguments is served.

    q ``[B, S, Hq, D]`` (or packed ``[T, Hq, D]`` with ``cu_seqlens``), k likewise with ``Hkv`` heads; the
    inputs are assumed valid (``moba_attention`` checks them first). ``options``: None reads the
    environment (:meth:`KernelOptions.from_env`). ``cu_host``: ``cu_seqlens`` as a host list, when the
    caller has read it already (so it is read once per call).
    """
    opts = resolve(options)
    backend = resolve_backend(backend, q)
    padded = cu_seqlens is None
    if padded:
        b, s = q.shape[:2]
        cu = [i * s for i in range(b + 1)]
    else:
        cu = list(cu_host) if cu_host is not None else cu_seqlens.tolist()
    longest = max((e - a for a, e in zip(cu[:-1], cu[1:], strict=True)), default=0)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    common = dict(backend=backend, cu_host=tuple(cu), padded=padded, longest=longest, chunk_size=chunk_size,
                  topk=topk, scale=scale, device=q.device, options=opts)
    if backend == "naive":
        return CallPlan(path="naive", **common)
    if opts.dense_when_full and q.is_cuda and covers_all(longest, chunk_size, topk):
        return CallPlan(path="dense", **common)
    from . import cudnn_blocks, dense_prefix  # the kernels' modules (Triton) only where they may run

    blocks = cudnn_blocks.plan(q, k, cu, chunk_size, opts)
    if blocks is not None:
        return CallPlan(path="long_blocks", blocks=blocks, **common)
    prefix = dense_prefix.plan(q, k, cu, chunk_size, topk, opts)
    if prefix is not None:
        return CallPlan(path="dense_prefix", prefix=prefix, **common)
    return CallPlan(path="sparse", **common)
