"""MoBA decoding inside transformers models: new tokens against a KV cache.

transformers hands the attention function the whole cache, ``key``/``value [B, Hkv, L, D]`` (new tokens
last), and the ``q`` new queries ``[B, Hq, q, D]``. MoBA layers call :func:`moba_cli.ops.moba.decode.moba_decode`
on ``[B, L, Hkv, D]`` views of the cache (no copies): each query's gate scores the *cached* block means,
it reads only the chosen blocks plus its own partial block, and the parts merge by log-sum-exp.

Block means live in a small side-state on the attention module (one per layer), together with a weak
reference to the cache tensor they describe. A forward pre-hook (in :mod:`moba_cli.integrations.attention`)
checks that the cache still holds, before this step's update, the tensor the state saw after the last
one: then the cache has only grown and the means are updated incrementally, once per completed block.
Otherwise (a new cache, a beam reorder, a crop) they are rebuilt once from the cached keys.

Left padding (what ``generate`` uses for batches) gives rows different first real tokens. Rows are grouped
into runs of consecutive rows that share the first real token; each run is one call on a view of the
cache that starts there, so blocks restart at each sequence's first real token, as in prefill.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from moba_cli.errors import MobaError
from moba_cli.integrations.masks import Spans
from moba_cli.integrations.settings import MobaSettings


@dataclass
class _RunState:
    means: torch.Tensor  # [n, NB, Hkv, D] float32 block means of the run's rows
    seqlen: int  # keys the means account for (equal for every row of a run)


@dataclass
class _DecodeState:
    keys_ref: weakref.ref  # the cache's key tensor (post-update) these means describe
    chunk_size: int
    batch: int
    runs: dict[tuple[int, int, int], _RunState] = field(default_factory=dict)


def _decode_ops():
    try:
        from moba_cli.ops.moba.decode import cache_block_means, moba_decode, update_block_means
    except ImportError as e:
        raise MobaError(f"MoBA decoding is not available in this build ({e})") from None
    return cache_block_means, update_block_means, moba_decode


def row_runs(starts: list[int]) -> list[tuple[int, int, int]]:
    """Group consecutive rows that share their first real token: ``[(r0, r1, start), ...]``."""
    runs: list[tuple[int, int, int]] = []
    r0 = 0
    for r in range(1, len(starts) + 1):
        if r == len(starts) or starts[r] != starts[r0]:
            runs.append((r0, r, starts[r0]))
            r0 = r
    return runs


def _valid_state(module: Any, chunk_size: int, batch: int, continues: bool) -> _DecodeState | None:
    """The layer's decode state if it still describes this cache (see the module docstring), else None."""
    state: _DecodeState | None = module.__dict__.get("_moba_decode")
    if state is None or not continues:  # keys_ref is dead by now: the update replaced that tensor
        return None
    if state.chunk_size != chunk_size or state.batch != batch:
        return None
    return state


def check_decode_cache(
    cache_info: dict[str, Any] | None, spans: Spans | None, length: int, position_ids: Any
) -> None:
    """Refuse caches whose key buffers are not "real tokens, left-padded at most" (static caches)."""
    if cache_info is not None:
        if cache_info["static"]:
            raise MobaError(
                f"MoBA needs transformers' default dynamic KV cache; {cache_info['static']} preallocates key "
                "buffers (use cache_implementation='dynamic')"
            )
        return
    # No pre-hook ran (the module's first call): check the keys against the queries' positions instead.
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:
        return
    last = position_ids[:, -1].tolist()
    real = spans.lengths if spans is not None else [length] * len(last)
    if len(last) == 1:  # one row of positions shared by the batch
        last = last * len(real)
    if len(last) == len(real) and any(p + 1 != n for p, n in zip(last, real, strict=True)):
        raise MobaError(
            "the KV cache holds more key slots than the tokens' positions account for (a static or "
            "preallocated cache?); MoBA needs transformers' default dynamic cache"
        )


def decode_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spans: Spans | None,
    settings: MobaSettings,
    full: bool,
    scaling: float | None,
    stats: dict[str, int],
    continues: bool,
) -> torch.Tensor:
    """Attention of ``q`` new tokens against the cache. Returns ``[B, q, Hq, D]`` in ``query``'s dtype.

    query ``[B, Hq, q, D]``; key/value ``[B, Hkv, L, D]`` with the new tokens at ``L-q .. L-1``.
    """
    b, hq, q_len, d = query.shape
    length = key.shape[2]
    if spans is None:
        starts = [0] * b
    else:
        if any(e != length for e in spans.ends) or any(length - s < q_len for s in spans.starts):
            raise MobaError(
                "MoBA decoding needs every row to end at the newest token: pad batches on the left "
                "(tokenizer.padding_side = 'left')"
            )
        starts = spans.starts
    out = query.new_empty(b, q_len, hq, d)
    runs = row_runs(starts)
    if full:
        for r0, r1, s in runs:
            out[r0:r1] = _dense(query[r0:r1], key[r0:r1, :, s:], value[r0:r1, :, s:], scaling, settings.backend)
        return out

    cache_block_means, update_block_means, moba_decode = _decode_ops()
    chunk = settings.chunk_size
    state = _valid_state(module, chunk, b, continues)
    new_state = _DecodeState(keys_ref=weakref.ref(key), chunk_size=chunk, batch=b)
    for r0, r1, s in runs:
        n = r1 - r0
        # [n, Hkv, L-s, D] -> [n, L-s, Hkv, D]: strided views of the cache, never copied.
        kr, vr = key[r0:r1, :, s:].transpose(1, 2), value[r0:r1, :, s:].transpose(1, 2)
        n_keys = length - s
        seqlens = torch.full((n,), n_keys, dtype=torch.int32, device=key.device)
        old = state.runs.get((r0, r1, s)) if state is not None else None
        if old is None or old.seqlen > n_keys:
            means = cache_block_means(kr, seqlens, chunk)
            stats["means_computed"] += 1
        elif n_keys // chunk > old.seqlen // chunk:
            # Plain ints: every row of a run has the same length, and no host sync is needed.
            means = update_block_means(old.means, kr, old.seqlen, n_keys, chunk)
            stats["means_updated"] += 1
        else:
            means = old.means
        new_state.runs[(r0, r1, s)] = _RunState(means=means, seqlen=n_keys)
        # The lengths are built here from the cache's own size: no range check (it would sync every step).
        kw = {"chunk_size": chunk, "topk": settings.topk, "softmax_scale": scaling, "backend": settings.backend,
              "check_lengths": False}
        if q_len == 1:
            o = moba_decode(query[r0:r1, :, 0].contiguous(), kr, vr, seqlens, means, **kw)
            out[r0:r1, 0] = o.to(out.dtype)
        else:
            # Several new tokens (chunked prefill, a second turn): each becomes a batch entry that sees
            # the cache up to itself. Row i's cache is broadcast with stride 0, still no copy.
            lens = torch.arange(n_keys - q_len + 1, n_keys + 1, dtype=torch.int32, device=key.device)
            for i in range(n):
                qi = query[r0 + i].transpose(0, 1).contiguous()  # [q, Hq, D]
                ki, vi = kr[i : i + 1].expand(q_len, -1, -1, -1), vr[i : i + 1].expand(q_len, -1, -1, -1)
                mi = means[i : i + 1].expand(q_len, *means.shape[1:])
                out[r0 + i] = moba_decode(qi, ki, vi, lens, mi, **kw).to(out.dtype)
    module.__dict__["_moba_decode"] = new_state
    return out


def _dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None, backend: str
) -> torch.Tensor:
    """Dense attention of the last ``q`` tokens. q ``[n, Hq, q, D]``, k/v ``[n, Hkv, Lr, D]`` -> ``[n, q, Hq, D]``."""
    q_len, lr = q.shape[2], k.shape[2]
    dtype = q.dtype
    if backend == "naive":  # the float32 reference, like full_attention(backend="naive")
        q, k, v = q.float(), k.float(), v.float()
    mask = None
    if q_len > 1:
        mask = torch.arange(lr, device=q.device)[None, :] <= torch.arange(lr - q_len, lr, device=q.device)[:, None]
    backends = contextlib.nullcontext()
    if q.is_cuda:
        # Not cuDNN: it plans again for every new cache length, ~12 ms of CPU per call on the H200
        # (scripts/gpu_hf_decode_profile.py), which made the full layers most of a decode step.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        backends = sdpa_kernel(order, set_priority=True)
    with backends:
        o = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scaling, enable_gqa=q.shape[1] != k.shape[1]
        )
    return o.transpose(1, 2).to(dtype)
