"""The dense prefix of MoBA: the first ``topk`` blocks of every sequence.

A query in block ``i < topk`` of its sequence has at most ``i <= topk - 1`` past blocks, so the gate keeps
all of them: its attention is plain causal attention over the sequence so far. The first
``P = topk * chunk_size`` queries of a sequence therefore compute dense causal attention over its first
``P`` keys, exactly. :class:`~.triton_moba.MobaFunction` leaves those queries out of its block-sparse
schedule and runs them through cuDNN's fused dense kernel instead, which does dense work faster than a
gathered schedule (H200, docs/perf-notes.md v9). The keys of the prefix are still read by later queries
through the sparse kernels: their dK/dV are the sum of both parts.

Only for batches of equal-length sequences (a padded batch, or packed sequences of one length), where
the prefixes form one ``[B, H, P, D]`` strided view and one cuDNN call covers them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from moba_cli.errors import MobaError

from .knobs import env_flag

# None: the default below; MOBA_DENSE_PREFIX=0/1 overrides (probes, benchmarks), tests set the flag.
DENSE_PREFIX: bool | None = None
DENSE_PREFIX_DEFAULT = True
# Shorter prefixes cost the sparse kernels little, while the split adds two launches and row copies.
MIN_ROWS = 16384
# Tests: the float32 reference below in place of cuDNN, on any device (so the split runs on CPU too).
USE_REFERENCE = False


@dataclass(frozen=True)
class Prefix:
    """``batch`` sequences of ``seqlen`` tokens each, packed; the first ``rows`` of each are dense."""

    batch: int
    seqlen: int
    rows: int


def _cudnn_ok(q: torch.Tensor, k: torch.Tensor) -> bool:
    # The cuDNN fused kernel as PyTorch exposes it: half precision, head dim a multiple of 8 up to 128.
    # Grouped heads (GQA/MQA) go in as they are: cuDNN reads each K/V head for its whole group (H200,
    # 32/8 heads: results/kernel-dev/v9-cudnn-gqa.json).
    if not (q.is_cuda and torch.backends.cudnn.is_available()):
        return False
    if torch.cuda.get_device_capability(q.device)[0] < 8:  # cuDNN's fused attention starts at Ampere
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or q.shape[-1] % 8 or q.shape[-1] > 128:
        return False
    return hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention_backward")


def plan(q: torch.Tensor, k: torch.Tensor, cu_host: list[int], chunk_size: int, topk: int) -> Prefix | None:
    """The dense prefix of a call on packed q ``[T, Hq, D]``, k ``[T, Hkv, D]`` with host offsets
    ``cu_host``, or None where it does not apply (or is switched off)."""
    want = DENSE_PREFIX if DENSE_PREFIX is not None else env_flag("MOBA_DENSE_PREFIX")
    if not (DENSE_PREFIX_DEFAULT if want is None else want):
        return None
    lens = {b - a for a, b in zip(cu_host[:-1], cu_host[1:], strict=True)}
    if len(lens) != 1:
        return None
    seqlen = lens.pop()
    rows = topk * chunk_size
    if rows >= seqlen or rows < MIN_ROWS:
        return None
    if not (USE_REFERENCE or _cudnn_ok(q, k)):
        return None
    return Prefix(batch=len(cu_host) - 1, seqlen=seqlen, rows=rows)


def view(x: torch.Tensor, pre: Prefix) -> torch.Tensor:
    """The prefix rows of packed ``x [T, H, D]`` as a strided ``[B, H, P, D]`` view (no copy)."""
    return x.view(pre.batch, pre.seqlen, *x.shape[1:])[:, : pre.rows].transpose(1, 2)


def forward(q, k, v, out, pre: Prefix, scale: float, need_lse: bool) -> tuple:
    """Dense causal attention of the prefix rows, written into ``out``'s prefix rows. Returns what
    :func:`backward` needs (cuDNN's log-sum-exp and bookkeeping)."""
    qv, kv, vv = view(q, pre), view(k, pre), view(v, pre)
    if not USE_REFERENCE:
        with _clear_errors():
            res = torch.ops.aten._scaled_dot_product_cudnn_attention(
                qv, kv, vv, None, need_lse, 0.0, True, False, scale=scale
            )
        od, state = res[0], tuple(res[1:8])
    else:
        od, lse = _reference_fwd(qv, kv, vv, scale)
        state = (lse,)
    view(out, pre).copy_(od)
    return state


def backward(dout, q, k, v, out, dq, dk, dv, pre: Prefix, scale: float, state: tuple) -> None:
    """Adds the prefix rows' gradients: dQ of those rows is theirs alone (the sparse part left them out),
    dK/dV of the prefix keys add to what later queries gave them."""
    args = [view(x, pre) for x in (dout, q, k, v, out)]
    if not USE_REFERENCE:
        lse, cu_q, cu_k, max_q, max_k, seed, offset = state
        with _clear_errors():
            dqd, dkd, dvd = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                *args, lse, seed, offset, None, cu_q, cu_k, max_q, max_k, 0.0, True, scale=scale
            )
    else:
        dqd, dkd, dvd = _reference_bwd(*args, state[0], scale)
    view(dq, pre).copy_(dqd)
    view(dk, pre).add_(dkd)
    view(dv, pre).add_(dvd)


@contextlib.contextmanager
def _clear_errors(part: str = "the dense prefix's", knob: str = "MOBA_DENSE_PREFIX=0") -> Iterator[None]:
    # The cuDNN ops are PyTorch-internal (their signatures are not a public API) and cuDNN refuses some
    # inputs at run time: say what failed and how to go on, instead of a stack trace from deep inside.
    try:
        yield
    except (RuntimeError, TypeError) as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise MobaError(f"{part} cuDNN call failed ({msg}); {knob} runs it in the sparse kernels") from None


def _reference_fwd(q, k, v, scale: float, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 attention, q ``[B, H, P, D]``, k/v ``[B, Hkv, N, D]`` -> (out in q's dtype, natural-log lse
    ``[B, H, P]``); causal needs ``P == N``. Stands in for cuDNN in CPU tests of the cuDNN paths."""
    g = q.shape[1] // k.shape[1]
    kf, vf = (x.float().repeat_interleave(g, 1) for x in (k, v))
    s = (q.float() @ kf.transpose(-1, -2)) * scale
    if causal:
        p_len = q.shape[2]
        mask = torch.ones(p_len, p_len, dtype=torch.bool, device=q.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return (torch.exp(s - lse[..., None]) @ vf).to(q.dtype), lse


def _reference_bwd(do, q, k, v, o, lse, scale: float):
    g = q.shape[1] // k.shape[1]
    kf, vf = (x.float().repeat_interleave(g, 1) for x in (k, v))
    qf, dof = q.float(), do.float()
    p_len = q.shape[2]
    mask = torch.ones(p_len, p_len, dtype=torch.bool, device=q.device).triu(1)
    s = ((qf @ kf.transpose(-1, -2)) * scale).masked_fill(mask, float("-inf"))
    p = torch.exp(s - lse[..., None])
    dv = p.transpose(-1, -2) @ dof
    dp = dof @ vf.transpose(-1, -2)
    delta = (dof * o.float()).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = ds @ kf
    dk = ds.transpose(-1, -2) @ qf
    b, h, n, d = dk.shape
    dk = dk.view(b, h // g, g, n, d).sum(2)
    dv = dv.view(b, h // g, g, n, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
