"""The attention implementations ``moba bench`` times, each behind one small interface.

A provider says whether it can run a case (:meth:`Provider.unavailable`) and builds an :class:`Op`: a
``forward()`` closure over the case's inputs returning the output in the bench's layout (prefill
``[B, S, Hq, D]``, decode ``[B, Hq, D]``). Everything a provider prepares outside ``forward`` (expanded
K/V, precomputed block means) is outside the timed region and is written in the op's ``note``.

Optional third-party packages (flash-attn, FlashMoBA, the MoBA authors' ``moba``) are imported lazily; a
missing one makes its records ``skipped`` with the reason.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moba_cli.bench.case import Case
from moba_cli.ops.moba.options import KernelOptions

# Reference providers that materialise large intermediates run only where they fit.
NAIVE_MAX_TOKENS = {"cuda": 32768, "cpu": 4096}  # batch * seq, forward
NAIVE_MAX_SCORES_BWD = {"cuda": 2**31, "cpu": 2**24}  # batch * heads * seq^2 kept for the float32 backward
MATH_MAX_SCORES = {"cuda": 2**30, "cpu": 2**26}  # batch * heads * seq^2 float32 scores of SDPA's math kernel


class Unsupported(Exception):
    """The provider cannot run this case (recorded as ``skipped`` with the message)."""


@dataclass
class Inputs:
    """Random inputs of one case, shared by every provider so their outputs can be compared.

    Prefill: q ``[B, S, Hq, D]``, k/v ``[B, S, Hkv, D]``. Decode: q ``[B, Hq, D]`` (the token at ``S - 1``),
    k/v the full KV cache ``[B, S, Hkv, D]``, ``cache_seqlens`` int32 ``[B]`` all ``S``.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cache_seqlens: torch.Tensor | None = None


def make_inputs(case: Case, seed: int) -> Inputs:
    """Fresh ``randn`` inputs (never zeros: a kernel that skips work must not look right by accident)."""
    dtype = getattr(torch, case.dtype)
    dev = torch.device(case.device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    grad = case.pass_ == "fwd+bwd"

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=dev, dtype=dtype).requires_grad_(grad)

    b, s, hq, hkv, d = case.batch, case.seq, case.heads, case.kv_heads, case.head_dim
    if case.pass_ == "decode":
        return Inputs(rnd(b, hq, d), rnd(b, s, hkv, d), rnd(b, s, hkv, d),
                      torch.full((b,), s, dtype=torch.int32, device=dev))
    return Inputs(rnd(b, s, hq, d), rnd(b, s, hkv, d), rnd(b, s, hkv, d))


@dataclass
class Op:
    """What the runner times. ``forward()`` -> output in the bench layout.

    ``grad_inputs`` are the tensors to differentiate (default q, k, v); ``fold_grads`` maps their gradients
    back to ``(dq, dk, dv)`` shaped like the inputs. ``context`` wraps every call (e.g. an SDPA backend).
    """

    forward: Callable[[], torch.Tensor]
    grad_inputs: tuple[torch.Tensor, ...]
    fold_grads: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]] = lambda g: g
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    note: str | None = None


@dataclass
class Provider:
    name: str
    kind: str  # "moba": attends MoBA's selection; "dense": full causal attention
    summary: str
    passes: tuple[str, ...] = ("fwd", "fwd+bwd")
    cuda_only: bool = True
    optional: bool = False  # a third-party package that is usually not installed
    extra: dict = field(default_factory=dict)

    def unavailable(self, case: Case) -> str | None:
        """Why this provider cannot run ``case`` (then the record is ``skipped``), or None."""
        if case.pass_ not in self.passes:
            return f"{self.name} has no {case.pass_} pass"
        if self.cuda_only and not case.device.startswith("cuda"):
            return f"{self.name} needs a CUDA GPU"
        return None

    def build(self, case: Case, inputs: Inputs) -> Op:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------
# MoBA providers


class MobaOurs(Provider):
    """``moba_attention`` through our public API; ``decode`` through ``moba_decode``."""

    def unavailable(self, case: Case) -> str | None:
        reason = super().unavailable(case)
        if reason:
            return reason
        backend = self.extra["backend"]
        if backend == "triton" and case.device == "cpu":
            from moba_cli.ops.moba.common import is_interp

            if not is_interp():
                return "moba-triton runs on CUDA, or on CPU only under TRITON_INTERPRET=1"
        if backend == "naive":
            dev = "cuda" if case.device.startswith("cuda") else "cpu"
            tokens = case.batch * case.seq
            if case.pass_ != "decode" and tokens > NAIVE_MAX_TOKENS[dev]:
                return f"moba-naive is capped at {NAIVE_MAX_TOKENS[dev]} tokens (batch x seq) on {dev}"
            if case.pass_ == "fwd+bwd" and case.batch * case.heads * case.seq**2 > NAIVE_MAX_SCORES_BWD[dev]:
                return "moba-naive's float32 backward would keep too many scores at this size"
        return None

    def build(self, case: Case, inputs: Inputs) -> Op:
        backend = self.extra["backend"]
        q, k, v = inputs.q, inputs.k, inputs.v
        if case.pass_ == "decode":
            from moba_cli.ops.moba.decode import cache_block_means, moba_decode

            means = cache_block_means(k, inputs.cache_seqlens, case.chunk)
            seqlens = inputs.cache_seqlens
            return Op(
                forward=lambda: moba_decode(q, k, v, seqlens, means, chunk_size=case.chunk, topk=case.topk,
                                            backend=backend, check_lengths=False),
                grad_inputs=(q, k, v),
                note="block means of the cache computed once, outside the timed region; cache_seqlens not "
                "range-checked on the host (as in the transformers integration)",
            )
        from moba_cli.ops.moba import moba_attention

        # Read once, so the timed calls and the record's note (from the call plan) see the same switches.
        options = KernelOptions.from_env()
        return Op(
            forward=lambda: moba_attention(q, k, v, chunk_size=case.chunk, topk=case.topk, backend=backend,
                                           options=options),
            grad_inputs=(q, k, v),
            note=_dense_parts(case, q, k, options) if backend == "triton" else None,
        )


def _dense_parts(case: Case, q: torch.Tensor, k: torch.Tensor, options: KernelOptions | None = None) -> str | None:
    """Which part of a moba-triton call runs through a dense kernel (same function, exact), for the record."""
    from moba_cli.ops.moba import plan_call

    if not case.device.startswith("cuda"):
        return None
    plan = plan_call(q, k, chunk_size=case.chunk, topk=case.topk, backend="triton", options=options)
    opts = plan.options
    if plan.path == "dense":
        return "top-k covers every block: the whole call is dense causal attention through SDPA (cuDNN first)"
    if plan.path == "long_blocks":
        return (f"long blocks ({case.chunk} keys >= {opts.cudnn_min_chunk}): the forward is dense cuDNN calls, "
                f"causal over the own blocks (halved from {2 * opts.own_split_min_piece} keys) and one per key "
                "block over the queries that chose it; the backward runs in the sparse kernels")
    if plan.path != "dense_prefix":
        return None
    return (f"dense prefix: the first {plan.prefix.rows} tokens of each sequence (its first {case.topk} blocks, "
            "where every past block is kept) through cuDNN, the rest in the sparse kernels")


class FlexMoba(Provider):
    """MoBA through FlexAttention block masks (:mod:`moba_cli.bench.flex_moba`)."""

    def unavailable(self, case: Case) -> str | None:
        reason = super().unavailable(case)
        if reason:
            return reason
        try:
            importlib.import_module("torch.nn.attention.flex_attention")
        except ImportError:
            return "this torch has no torch.nn.attention.flex_attention"
        if case.seq % case.chunk or case.seq % 128:
            return "flex-moba needs seq to be a multiple of both the chunk and 128"
        if case.device.startswith("cuda") and case.chunk % 128:
            return "flex-moba needs a chunk that is a multiple of 128 on CUDA (its kernel's key tile)"
        if case.device == "cpu" and case.pass_ == "fwd+bwd":
            return "FlexAttention has no backward on CPU"
        return None

    def build(self, case: Case, inputs: Inputs) -> Op:
        from moba_cli.bench.flex_moba import flex_moba, make_mask_mod, num_words

        q, k, v = inputs.q, inputs.k, inputs.v
        compiled = case.device.startswith("cuda")
        bits = torch.zeros(case.batch, case.heads, case.seq, num_words(case.seq, case.chunk), dtype=torch.int32,
                           device=q.device)
        mask_mod = make_mask_mod(bits, case.chunk)
        note = ("float32 gate, chosen-block bits and BlockMask built inside every timed call (bits buffer "
                "preallocated)")
        if not compiled:
            note += "; eager (unfused) on CPU"
        return Op(
            forward=lambda: flex_moba(q, k, v, case.chunk, case.topk, bits, mask_mod, compiled),
            grad_inputs=(q, k, v),
            note=note,
        )


def _packed(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _cu_seqlens(case: Case, device) -> torch.Tensor:
    return torch.arange(0, (case.batch + 1) * case.seq, case.seq, dtype=torch.int32, device=device)


class FlashMoba(Provider):
    """FlashMoBA's ``flash_moba_varlen_func`` (optional package ``flash_moba``)."""

    def unavailable(self, case: Case) -> str | None:
        return super().unavailable(case) or _import_reason("flash_moba", "FlashMoBA (flash_moba) is not installed")

    def build(self, case: Case, inputs: Inputs) -> Op:
        from flash_moba import flash_moba_varlen_func

        q, k, v = inputs.q, inputs.k, inputs.v
        cu = _cu_seqlens(case, q.device)
        return Op(
            forward=lambda: flash_moba_varlen_func(
                _packed(q), _packed(k), _packed(v), cu, cu, case.seq, case.seq, case.chunk, case.topk, causal=True
            ).view(q.shape),
            grad_inputs=(q, k, v),
        )


class MobaRef(Provider):
    """The MoBA authors' ``moba.moba_attn_varlen`` (optional package ``moba``; needs flash-attn 2.6.x)."""

    def unavailable(self, case: Case) -> str | None:
        return super().unavailable(case) or _import_reason("moba", "the MoBA authors' package (moba) is not installed")

    def build(self, case: Case, inputs: Inputs) -> Op:
        try:
            from moba import moba_attn_varlen
        except ImportError as e:
            raise Unsupported(f"cannot import moba.moba_attn_varlen: {e}") from None
        q = inputs.q
        k, v, fold, note = _expand_kv(case, inputs)
        cu = _cu_seqlens(case, q.device)
        return Op(
            forward=lambda: moba_attn_varlen(_packed(q), _packed(k), _packed(v), cu, case.seq, case.chunk,
                                             case.topk).view(q.shape),
            grad_inputs=(q, k, v),
            fold_grads=fold,
            note=note,
        )


# ----------------------------------------------------------------------------------------------------------
# Dense providers


def _expand_kv(case: Case, inputs: Inputs):
    """For kernels without GQA: K/V repeated to ``Hq`` heads *outside* the timed region (best case for
    the baseline). Gradients then come w.r.t. the copies; ``fold`` sums them back per KV head."""
    k, v = inputs.k, inputs.v
    g = case.heads // case.kv_heads
    if g == 1:
        return k, v, (lambda grads: grads), None
    grad = case.pass_ == "fwd+bwd"
    ke = k.detach().repeat_interleave(g, dim=2).requires_grad_(grad)
    ve = v.detach().repeat_interleave(g, dim=2).requires_grad_(grad)

    def fold(grads):
        dq, dk, dv = grads
        shape = (*k.shape[:3], g, k.shape[3])
        return dq, dk.view(shape).sum(3), dv.view(shape).sum(3)

    note = f"K/V expanded from {case.kv_heads} to {case.heads} heads outside the timed region (no GQA support)"
    return ke, ve, fold, note


_SDPA_PROBES: dict[tuple, str | None] = {}


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, name)


def _sdpa_context(backend: str):
    from torch.nn.attention import sdpa_kernel

    return lambda: sdpa_kernel([_sdpa_backend(backend)])


def sdpa_probe(backend: str, case: Case, gqa: bool) -> str | None:
    """Run the backend once on a small input of the case's kind; None if it works, else why not."""
    key = (backend, case.device, case.dtype, case.head_dim, case.heads, case.kv_heads, gqa, case.pass_)
    if key in _SDPA_PROBES:
        return _SDPA_PROBES[key]
    dtype, dev = getattr(torch, case.dtype), torch.device(case.device)
    hkv = case.kv_heads if gqa else case.heads
    s_q = 1 if case.pass_ == "decode" else 256
    grad = case.pass_ == "fwd+bwd"
    # Same memory layout as the real call: [B, S, H, D] tensors seen through .transpose(1, 2).
    q = torch.randn(1, s_q, case.heads, case.head_dim, device=dev, dtype=dtype).transpose(1, 2)
    k = torch.randn(1, 256, hkv, case.head_dim, device=dev, dtype=dtype).transpose(1, 2)
    q.requires_grad_(grad)
    k.requires_grad_(grad)
    reason = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with _sdpa_context(backend)():
                o = torch.nn.functional.scaled_dot_product_attention(
                    q, k, k, is_causal=case.pass_ != "decode", enable_gqa=gqa and case.heads != hkv
                )
                if grad:
                    o.sum().backward()
        except RuntimeError as e:
            details = [str(w.message).splitlines()[0] for w in caught]
            reason = f"torch SDPA has no {backend} kernel here: " + ("; ".join(details[:3]) or str(e))
    _SDPA_PROBES[key] = reason
    return reason


class SdpaDense(Provider):
    """Dense causal attention through one torch SDPA backend (``sdpa_kernel([backend])``)."""

    def unavailable(self, case: Case) -> str | None:
        reason = super().unavailable(case)
        if reason:
            return reason
        if self.extra["backend"] == "MATH":
            dev = "cuda" if case.device.startswith("cuda") else "cpu"
            s_q = 1 if case.pass_ == "decode" else case.seq
            if case.batch * case.heads * s_q * case.seq > MATH_MAX_SCORES[dev]:
                return "sdpa-math materialises the full score matrix; too large at this size"
        return None

    def build(self, case: Case, inputs: Inputs) -> Op:
        backend = self.extra["backend"]
        q = inputs.q
        gqa = case.heads != case.kv_heads
        k, v, fold, note = inputs.k, inputs.v, (lambda g: g), None
        if gqa:
            why = sdpa_probe(backend, case, gqa=True)
            if why is not None:
                k, v, fold, note = _expand_kv(case, inputs)
                gqa = False
        why = sdpa_probe(backend, case, gqa=gqa)
        if why is not None:
            raise Unsupported(why)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if case.pass_ == "decode":
            def forward():
                o = sdpa(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=gqa)
                return o.squeeze(2)
        else:
            def forward():
                o = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=gqa)
                return o.transpose(1, 2)
        return Op(forward=forward, grad_inputs=(q, k, v), fold_grads=fold, context=_sdpa_context(backend), note=note)


class FlashAttn(Provider):
    """Dense attention through the flash-attn package (``flash_attn_func`` / ``flash_attn_with_kvcache``)."""

    def unavailable(self, case: Case) -> str | None:
        return super().unavailable(case) or _import_reason("flash_attn", "flash-attn is not installed")

    def build(self, case: Case, inputs: Inputs) -> Op:
        import flash_attn

        q, k, v = inputs.q, inputs.k, inputs.v
        if case.pass_ == "decode":
            seqlens = inputs.cache_seqlens
            return Op(
                forward=lambda: flash_attn.flash_attn_with_kvcache(q.unsqueeze(1), k, v, cache_seqlens=seqlens)
                .squeeze(1),
                grad_inputs=(q, k, v),
            )
        return Op(forward=lambda: flash_attn.flash_attn_func(q, k, v, causal=True), grad_inputs=(q, k, v))


def _import_reason(module: str, message: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a broken optional install is reported, not raised
        return f"{message} ({type(e).__name__}: {e})"
    return None


PREFILL = ("fwd", "fwd+bwd")
ALL_PASSES = ("fwd", "fwd+bwd", "decode")

PROVIDERS: list[Provider] = [
    MobaOurs("moba-triton", "moba", "ours: moba_attention(backend='triton'); decode: moba_decode", ALL_PASSES,
             cuda_only=False, extra={"backend": "triton"}),
    MobaOurs("moba-naive", "moba", "float32 reference (moba_attention(backend='naive')), small sizes only",
             ALL_PASSES, cuda_only=False, extra={"backend": "naive"}),
    FlexMoba("flex-moba", "moba", "MoBA with stock PyTorch: torch gate + FlexAttention BlockMask (compiled)",
             PREFILL, cuda_only=False),
    FlashMoba("flash-moba", "moba", "FlashMoBA's flash_moba_varlen_func (optional package)", PREFILL,
              optional=True),
    MobaRef("moba-ref", "moba", "the MoBA authors' moba.moba_attn_varlen (optional; needs flash-attn 2.6.x)",
            PREFILL, optional=True),
    SdpaDense("sdpa-cudnn", "dense", "dense causal, torch SDPA cuDNN backend", ALL_PASSES,
              extra={"backend": "CUDNN_ATTENTION"}),
    SdpaDense("sdpa-flash", "dense", "dense causal, torch SDPA FlashAttention-2 backend", ALL_PASSES,
              extra={"backend": "FLASH_ATTENTION"}),
    FlashAttn("flash-attn", "dense", "dense causal, flash-attn package (optional)", ALL_PASSES, optional=True),
    SdpaDense("sdpa-math", "dense", "dense causal, torch SDPA math backend (CPU smoke runs)", ALL_PASSES,
              cuda_only=False, extra={"backend": "MATH"}),
]
PROVIDER_NAMES = [p.name for p in PROVIDERS]
BY_NAME = {p.name: p for p in PROVIDERS}
DENSE_BASELINES = ("sdpa-cudnn", "sdpa-flash")
DEFAULT_PROVIDERS = {
    "cuda": [n for n in PROVIDER_NAMES if n != "sdpa-math"],
    "cpu": list(PROVIDER_NAMES),  # CUDA-only ones are recorded as skipped
}
