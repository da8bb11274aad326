"""Dense attention: the dense paths' SDPA causal attention (shortcut, dense prefix, long blocks),
full_attention's compute, cuDNN's availability and one-line errors, and the float32 stand-in for cuDNN
that CPU tests run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from moba_cli.errors import MobaError


def covers_all(longest: int, chunk_size: int, topk: int) -> bool:
    """Whether top-k covers every block of a sequence of ``longest`` tokens (MoBA is then dense)."""
    return topk >= -(-longest // chunk_size)


def dense_causal(q, k, v, cu_seqlens: list[int] | None, scale: float) -> torch.Tensor:
    """Dense causal attention through SDPA, cuDNN first. q ``[B, S, Hq, D]`` (``cu_seqlens`` None) or
    packed ``[T, Hq, D]`` with host-side ``cu_seqlens``; returns q's shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    order.append(SDPBackend.MATH)
    gqa = q.shape[-2] != k.shape[-2]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with sdpa_kernel(order, set_priority=True):
        if cu_seqlens is None:
            o = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale,
                     enable_gqa=gqa)
            return o.transpose(1, 2).contiguous()  # callers may .view() the result, as with the kernels'
        outs = []
        for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True):
            if b > a:
                qs, ks, vs = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))
                outs.append(sdpa(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)[0].transpose(0, 1))
        return torch.cat(outs, 0) if outs else torch.empty_like(q)


def full_causal(q, k, v, cu_seqlens: list[int] | None, scale: float | None, backend: str) -> torch.Tensor:
    """:func:`~.api.full_attention` after its checks (the eager call and the ``moba::full_fwd`` op share it).

    q ``[B, S, Hq, D]`` (``cu_seqlens`` None) or packed ``[T, Hq, D]`` with host-side ``cu_seqlens``.
    ``backend`` ``"naive"``: float32, one sequence at a time; else SDPA in the inputs' dtype (whatever
    kernel PyTorch picks). Returns q's shape and dtype.
    """
    if backend == "naive":
        from .naive import full_attention_naive

        b, s = (1, q.shape[0]) if cu_seqlens is not None else q.shape[:2]
        cu = cu_seqlens if cu_seqlens is not None else [i * s for i in range(b + 1)]
        qp, kp, vp = (x.reshape(b * s, *x.shape[-2:]) for x in (q, k, v))
        with torch.autocast(q.device.type, enabled=False):
            return full_attention_naive(qp, kp, vp, cu, scale).to(q.dtype).view(q.shape)
    gqa = q.shape[-2] != k.shape[-2]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if cu_seqlens is None:
        o = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=gqa)
        return o.transpose(1, 2).contiguous()
    out = torch.empty_like(q)
    for s0, s1 in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True):
        if s1 > s0:
            qs, ks, vs = (x[s0:s1].transpose(0, 1)[None] for x in (q, k, v))
            out[s0:s1] = sdpa(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)[0].transpose(0, 1)
    return out


def cudnn_ok(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether cuDNN's fused attention takes q, k: CUDA on Ampere or newer, half precision, head dim a
    multiple of 8 up to 128. Grouped heads (GQA/MQA) go in as they are: cuDNN reads each K/V head for its
    whole group (H200, 32/8 heads: results/kernel-dev/v9-cudnn-gqa.json)."""
    if not (q.is_cuda and torch.backends.cudnn.is_available()):
        return False
    if torch.cuda.get_device_capability(q.device)[0] < 8:
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or q.shape[-1] % 8 or q.shape[-1] > 128:
        return False
    return hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention_backward")


@contextlib.contextmanager
def clear_errors(part: str = "the dense prefix's", knob: str = "MOBA_DENSE_PREFIX=0") -> Iterator[None]:
    """Turn a failing cuDNN call into one MobaError naming the part and the switch that avoids it."""
    # The cuDNN ops are PyTorch-internal (their signatures are not a public API) and cuDNN refuses some
    # inputs at run time: say what failed and how to go on, instead of a stack trace from deep inside.
    try:
        yield
    except (RuntimeError, TypeError) as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise MobaError(f"{part} cuDNN call failed ({msg}); {knob} runs it in the sparse kernels") from None


def reference_fwd(q, k, v, scale: float, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
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


def reference_bwd(do, q, k, v, o, lse, scale: float):
    """Gradients of causal :func:`reference_fwd` (``[B, H, P, D]`` views) -> dq, dk, dv in the inputs' dtypes."""
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
