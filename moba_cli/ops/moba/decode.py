"""MoBA decode: the newest query token of each sequence attends its KV cache through the MoBA gate.

Cache layout: ``k_cache``/``v_cache`` ``[B, L, Hkv, D]`` with any strides, so a transformers cache stored
``[B, Hkv, L, D]`` is passed as ``cache.transpose(1, 2)`` without a copy. Sequence ``b`` holds
``cache_seqlens[b]`` valid tokens; the query is the last of them (position ``cache_seqlens[b] - 1``).

Blocks are ``chunk_size`` keys from position 0. The query's own block is the one holding its position
(partial, always attended); the complete past blocks are those before it. The gate scores them by
``q . mean(block keys)`` in float32 using ``block_means [B, NB, Hkv, D]``, kept up to date with
:func:`cache_block_means` (once, after prefill) and :func:`update_block_means` (when a block completes).
The result equals the last row of :func:`moba_cli.ops.moba.moba_attention` on the whole sequence.
"""

from __future__ import annotations

import math

import torch

from moba_cli.errors import MobaError

from .layout import decode_slots
from .naive import score_blocks, top_blocks
from .validate import SUPPORTED_DTYPES, check_moba_params, check_scale, resolve_backend


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _capturing(t: torch.Tensor) -> bool:
    # Value checks need a host sync, which a CUDA graph capture forbids; the capture skips them.
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_cache(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise MobaError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise MobaError(f"{name} must have rank 4 [B, L, Hkv, D], got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise MobaError(f"{name} dtype {t.dtype} is not supported; use float16, bfloat16 or float32")
    if t.shape[1] == 0:
        raise MobaError(f"{name} has an empty length dimension (shape {tuple(t.shape)})")
    return t


def _check_lengths(
    name: str, lens: object, bsz: int, device: torch.device, lo: int, hi: int, values: bool = True
) -> torch.Tensor:
    """``lens`` must be int32 ``[B]`` on ``device`` with values in ``lo..hi`` (values checked unless capturing
    or ``values`` is False)."""
    if not isinstance(lens, torch.Tensor) or lens.dim() != 1 or lens.shape[0] != bsz:
        shape = tuple(lens.shape) if isinstance(lens, torch.Tensor) else type(lens).__name__
        raise MobaError(f"{name} must be a 1-D tensor [B={bsz}], got {shape}")
    if lens.dtype != torch.int32:
        raise MobaError(f"{name} must be int32, got {lens.dtype}")
    if lens.device != device:
        raise MobaError(f"{name} must be on {device}, got {lens.device}")
    if values and lens.numel() > 0 and not _capturing(lens):
        mn, mx = torch.stack([lens.min(), lens.max()]).tolist()
        if mn < lo or mx > hi:
            raise MobaError(f"{name} values must lie in {lo}..{hi}, got min {mn} and max {mx}")
    return lens


def _check_means(block_means: object, bsz: int, hkv: int, d: int, min_blocks: int, device) -> torch.Tensor:
    if not isinstance(block_means, torch.Tensor):
        raise MobaError(f"block_means must be a torch.Tensor, got {type(block_means).__name__}")
    if block_means.dtype != torch.float32:
        raise MobaError(f"block_means must be float32, got {block_means.dtype}")
    if block_means.device != device:
        raise MobaError(f"block_means must be on {device}, got {block_means.device}")
    bm = block_means.shape
    if block_means.dim() != 4 or bm[0] != bsz or bm[2] != hkv or bm[3] != d or bm[1] < min_blocks:
        raise MobaError(
            f"block_means must be [B={bsz}, NB>={min_blocks}, Hkv={hkv}, D={d}] for this cache, got "
            f"{tuple(bm)}; build it with cache_block_means and keep it current with update_block_means"
        )
    return block_means


def _means_of_blocks(k: torch.Tensor, first: int, last: int, chunk_size: int) -> torch.Tensor:
    """Float32 means of the full blocks ``first..last-1`` of ``k [B, L, Hkv, D]`` -> ``[B, n, Hkv, D]``.

    Sums in float32 straight from the cache's dtype and strides (no float copy of the keys on CUDA).
    """
    keys = k[:, first * chunk_size : last * chunk_size].unflatten(1, (last - first, chunk_size))
    return keys.sum(dim=2, dtype=torch.float32) / chunk_size


def cache_block_means(k_cache: torch.Tensor, cache_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Mean key of every block of the cache, for the decode gate.

    k_cache ``[B, L, Hkv, D]`` (any strides), cache_seqlens int32 ``[B]`` (0..L) -> ``block_means
    [B, ceil(L / chunk_size), Hkv, D]`` float32. Blocks that are not complete for their sequence (block
    end > ``cache_seqlens[b]``) are zero.
    """
    _check_cache("k_cache", k_cache)
    chunk_size, _ = check_moba_params(chunk_size, 1)
    bsz, cache_len, hkv, d = k_cache.shape
    _check_lengths("cache_seqlens", cache_seqlens, bsz, k_cache.device, 0, cache_len)
    nb = _cdiv(cache_len, chunk_size)
    full = cache_len // chunk_size
    out = torch.zeros(bsz, nb, hkv, d, dtype=torch.float32, device=k_cache.device)
    if full > 0:
        means = _means_of_blocks(k_cache, 0, full, chunk_size)
        ends = (torch.arange(full, device=k_cache.device) + 1) * chunk_size
        complete = ends[None, :] <= cache_seqlens[:, None].long()  # [B, full]
        # where, not a product: keys past a sequence's end may be garbage (even NaN).
        out[:, :full] = torch.where(complete[:, :, None, None], means, 0.0)
    return out


def update_block_means(
    block_means: torch.Tensor,
    k_cache: torch.Tensor,
    old_seqlens: torch.Tensor | int,
    new_seqlens: torch.Tensor | int,
    chunk_size: int,
) -> torch.Tensor:
    """Add the means of blocks completed while the cache grew from ``old_seqlens`` to ``new_seqlens``.

    block_means ``[B, NB, Hkv, D]`` float32 (from :func:`cache_block_means`); k_cache ``[B, L, Hkv, D]``
    (any strides) already holding the new tokens; old/new lengths int32 ``[B]`` tensors (or ints, for
    every sequence). Only blocks ``j`` with ``old < (j + 1) * chunk_size <= new`` are computed, from their
    own keys; other entries are left as they are. Writes in place and returns ``block_means`` when it has
    room for ``ceil(L / chunk_size)`` blocks; otherwise returns a new, grown tensor holding the old entries.
    """
    _check_cache("k_cache", k_cache)
    chunk_size, _ = check_moba_params(chunk_size, 1)
    bsz, cache_len, hkv, d = k_cache.shape
    dev = k_cache.device
    if not isinstance(block_means, torch.Tensor) or block_means.dim() != 4:
        raise MobaError("block_means must be a rank-4 tensor [B, NB, Hkv, D] from cache_block_means")
    _check_means(block_means, bsz, hkv, d, 0, dev)
    lens = []
    for name, x in (("old_seqlens", old_seqlens), ("new_seqlens", new_seqlens)):
        if isinstance(x, int) and not isinstance(x, bool):
            if not 0 <= x <= cache_len:
                raise MobaError(f"{name} must lie in 0..{cache_len}, got {x}")
            lens.append([x] * bsz)
        else:
            lens.append(_check_lengths(name, x, bsz, dev, 0, cache_len).tolist())
    old, new = lens
    if any(n < o for o, n in zip(old, new, strict=True)):
        raise MobaError("new_seqlens must be >= old_seqlens for every sequence (the cache only grows)")
    nb = _cdiv(cache_len, chunk_size)
    out = block_means
    if block_means.shape[1] < nb:
        out = torch.zeros(bsz, nb, hkv, d, dtype=torch.float32, device=dev)
        out[:, : block_means.shape[1]] = block_means
    for b, (o, n) in enumerate(zip(old, new, strict=True)):
        first, last = o // chunk_size, n // chunk_size
        if last > first:
            out[b, first:last] = _means_of_blocks(k_cache[b : b + 1], first, last, chunk_size)[0]
    return out


def select_decode_blocks(
    q: torch.Tensor, block_means: torch.Tensor, cache_seqlens: torch.Tensor, chunk_size: int, topk: int,
    cache_len: int,
) -> torch.Tensor:
    """Reference gate: ``block_ids [B, Hq, slots]`` int32, slot 0 the own block, then the chosen past
    blocks by decreasing score (earlier block first on equal scores), -1 where fewer exist.

    ``slots = max(1, min(topk, ceil(cache_len / chunk_size)))``, the Triton kernel's format.
    """
    bsz, hq, d = q.shape
    slots = decode_slots(topk, cache_len, chunk_size)
    out = torch.full((bsz, hq, slots), -1, dtype=torch.int32, device=q.device)
    for b, n in enumerate(cache_seqlens.tolist()):
        own = (n - 1) // chunk_size
        out[b, :, 0] = own
        take = min(slots - 1, own)
        if take == 0:
            continue
        # the prefill reference's rule (naive.top_blocks): every block before the own one may be chosen
        out[b, :, 1 : 1 + take] = top_blocks(score_blocks(q[b], block_means[b, :own]), take).to(torch.int32)
    return out


def moba_decode_naive(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_ids: torch.Tensor,
    chunk_size: int,
    softmax_scale: float,
) -> torch.Tensor:
    """Float32 attention of each head over the blocks in ``block_ids`` -> ``[B, Hq, D]`` float32.

    Works one (sequence, KV head) at a time, so memory stays O(cache_len * D) however long the cache.
    """
    bsz, hq, d = q.shape
    hkv = k_cache.shape[2]
    g = hq // hkv
    out = torch.empty(bsz, hq, d, dtype=torch.float32, device=q.device)
    for b, n in enumerate(cache_seqlens.tolist()):
        nb = _cdiv(n, chunk_size)
        key_block = torch.arange(n, device=q.device) // chunk_size
        for h in range(hkv):
            heads = slice(h * g, (h + 1) * g)
            ids = block_ids[b, heads].long()  # [G, slots]
            chosen = torch.zeros(g, nb + 1, dtype=torch.bool, device=q.device)
            chosen.scatter_(1, torch.where(ids >= 0, ids, nb), True)
            allowed = chosen[:, :nb][:, key_block]  # [G, n]; every cached key is causal for the query
            kf, vf = k_cache[b, :n, h].float(), v_cache[b, :n, h].float()
            s = (q[b, heads].float() @ kf.T) * softmax_scale
            p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
            out[b, heads] = p @ vf
    return out


def moba_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_means: torch.Tensor,
    *,
    chunk_size: int,
    topk: int,
    softmax_scale: float | None = None,
    backend: str = "auto",
    check_lengths: bool = True,
) -> torch.Tensor:
    """MoBA attention of one new query token per sequence against its KV cache.

    Args:
        q: ``[B, Hq, D]``, the newest token of each sequence, already written into the cache at
            position ``cache_seqlens[b] - 1``.
        k_cache, v_cache: ``[B, L, Hkv, D]``, any strides (a ``[B, Hkv, L, D]`` cache as
            ``.transpose(1, 2)``); ``Hq`` a multiple of ``Hkv``. Never copied, never repeated per head.
        cache_seqlens: int32 ``[B]``, valid tokens per sequence including the new one, in ``1..L``.
        block_means: float32 ``[B, NB, Hkv, D]``, ``NB >= (L - 1) // chunk_size``, valid for the complete
            blocks before each query's own block (:func:`cache_block_means`, :func:`update_block_means`).
        chunk_size, topk: as in :func:`moba_cli.ops.moba.moba_attention` (topk counts the own block).
        softmax_scale: defaults to ``1/sqrt(D)``.
        backend: ``"naive"`` (float32 torch reference, any device), ``"triton"`` (CUDA, or CPU with
            ``TRITON_INTERPRET=1``), ``"auto"`` (triton on CUDA, naive elsewhere).

    Each query head takes its own (partial) block plus the ``topk - 1`` complete past blocks with the
    highest ``q . mean`` (float32; ties to the earlier block); the blocks are merged by log-sum-exp.
    Equals the last row of prefill MoBA. Returns ``[B, Hq, D]`` in q's dtype.

    The range check of ``cache_seqlens`` syncs with the host (it is skipped during CUDA graph capture).
    ``check_lengths=False`` skips it for callers whose lengths are right by construction (the transformers
    integration derives them from its own cache): a decode step then never waits for the GPU. Lengths
    outside ``1..L`` would then read outside the cache.
    """
    if not isinstance(q, torch.Tensor):
        raise MobaError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 3:
        raise MobaError(f"q must have rank 3 [B, Hq, D] (one token per sequence), got shape {tuple(q.shape)}")
    _check_cache("k_cache", k_cache)
    _check_cache("v_cache", v_cache)
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise MobaError(
            f"q, k_cache and v_cache must share one dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if q.dtype not in SUPPORTED_DTYPES:
        raise MobaError(f"dtype {q.dtype} is not supported; use float16, bfloat16 or float32")
    if not (q.device == k_cache.device == v_cache.device):
        raise MobaError(
            f"q, k_cache and v_cache must be on one device, got {q.device}, {k_cache.device}, {v_cache.device}"
        )
    if k_cache.shape != v_cache.shape:
        raise MobaError(
            f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    bsz, hq, d = q.shape
    _, cache_len, hkv, dk = k_cache.shape
    if k_cache.shape[0] != bsz:
        raise MobaError(f"q has batch {bsz} but the cache has batch {k_cache.shape[0]}")
    if dk != d:
        raise MobaError(f"q and k_cache must have the same head dim, got {d} and {dk}")
    if hq == 0 or hkv == 0 or hq % hkv != 0:
        raise MobaError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    chunk_size, topk = check_moba_params(chunk_size, topk)
    check_scale(softmax_scale)
    backend = resolve_backend(backend, q)
    _check_lengths("cache_seqlens", cache_seqlens, bsz, q.device, 1, cache_len, values=check_lengths)
    _check_means(block_means, bsz, hkv, d, (cache_len - 1) // chunk_size, q.device)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    if bsz == 0:
        return q.new_empty(q.shape)
    if backend == "naive":
        ids = select_decode_blocks(q, block_means, cache_seqlens, chunk_size, topk, cache_len)
        return moba_decode_naive(q, k_cache, v_cache, cache_seqlens, ids, chunk_size, scale).to(q.dtype)
    from .triton_decode import moba_decode_triton

    return moba_decode_triton(q, k_cache, v_cache, cache_seqlens, block_means, chunk_size, topk, scale)
