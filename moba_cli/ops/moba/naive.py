"""Readable float32 reference for MoBA. Runs on any device.

Memory is O(T * blocks) for the gate and O(tile * S) for attention (queries are processed in tiles),
never O(S^2), so it can check 64K-token sequences on a GPU.

Selection format shared with the Triton backend: ``block_idx [T, Hq, slots]`` int32 of *global* block
ids (see :mod:`moba_cli.ops.moba.layout`). Slot 0 is the query's own block; slots 1.. hold the chosen
past blocks in decreasing gate score, ``-1`` where a query has fewer past blocks than ``topk - 1``.

Tie rule: blocks with equal gate scores are ranked by block index, the earlier block first. A NaN score
(a NaN key in the block) ranks above every number, as in the Triton gates' integer keys, so the NaN
reaches the output as it does in dense attention. :func:`score_blocks` and :func:`top_blocks` are the
gate rule in torch, shared by the decode reference, the bench's check and ``moba compare``.
"""

from __future__ import annotations

import math

import torch

from .layout import BlockLayout, num_slots


def block_means(k: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Mean key of each block in float32. k ``[T, Hkv, D]`` -> ``[NB, Hkv, D]``."""
    out = torch.empty(layout.num_blocks, k.shape[1], k.shape[2], dtype=torch.float32, device=k.device)
    lens = layout.block_end - layout.block_start
    # Blocks of one length are gathered [n, length, Hkv, D] and summed along the length: the same summation
    # for each, so blocks with identical keys get bit-identical means (the tie rule depends on it), and
    # every key is read once. index_add_ would sum with atomics on CUDA, in no fixed order.
    for n in torch.unique(lens).tolist():
        blocks = torch.nonzero(lens == n).flatten()
        idx = layout.block_start[blocks].long()[:, None] + torch.arange(n, device=k.device)[None, :]
        out[blocks] = k[idx].float().sum(1) / n
    return out


def score_blocks(q: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Gate scores ``q . mean`` in float32: q ``[..., Hq, D]``, means ``[NB, Hkv, D]`` float32 ->
    ``[..., Hq, NB]``. Heads that share a KV head score the same means, without copying them."""
    hkv = means.shape[1]
    lead, hq, d = q.shape[:-2], q.shape[-2], q.shape[-1]
    qg = q.float().reshape(-1, hkv, hq // hkv, d)
    scores = torch.einsum("shgd,nhd->shgn", qg, means.float())
    return scores.reshape(*lead, hq, means.shape[0])


def top_blocks(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The gate's pick: the ``n`` best of ``scores [..., NB]`` (``-inf`` where a block may not be chosen) ->
    local block indices ``[..., n]`` int64, best first, ``-1`` where fewer than ``n`` may be chosen.
    Ties go to the earlier block; NaN ranks first (see the module docstring)."""
    # A stable descending sort keeps the earlier block first among equal scores and puts NaN first.
    order = torch.sort(scores, dim=-1, descending=True, stable=True)
    val, idx = order.values[..., :n], order.indices[..., :n]
    return torch.where(val != float("-inf"), idx, torch.full_like(idx, -1))


def gate_scores(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout, seq: int) -> torch.Tensor:
    """Gate scores of sequence ``seq``: ``[S_i, Hq, nb_i]`` float32, q . mean(block keys).

    Blocks that are not complete past blocks of the query (its own block and later ones) get -inf.
    """
    cu = layout.cu_seqlens.tolist()
    s0, s1 = cu[seq], cu[seq + 1]
    blocks = torch.nonzero((layout.block_start >= s0) & (layout.block_start < s1)).flatten()
    scores = score_blocks(q[s0:s1], block_means(k, layout)[blocks])
    own_local = (layout.token_block[s0:s1] - layout.token_first_block[s0:s1]).long()
    past = torch.arange(len(blocks), device=q.device)[None, :] < own_local[:, None]  # [S_i, nb_i]
    return scores.masked_fill(~past[:, None, :], float("-inf"))


def select_blocks(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout, topk: int) -> torch.Tensor:
    """Choose each query head's blocks. q ``[T, Hq, D]``, k ``[T, Hkv, D]`` -> ``block_idx [T, Hq, slots]``."""
    t_total, hq = q.shape[0], q.shape[1]
    slots = num_slots(topk, layout.max_blocks)
    out = torch.full((t_total, hq, slots), -1, dtype=torch.int32, device=q.device)
    out[:, :, 0] = layout.token_block[:, None]
    if slots == 1:
        return out
    cu = layout.cu_seqlens.tolist()
    for i in range(len(cu) - 1):
        s0, s1 = cu[i], cu[i + 1]
        if s1 == s0:
            continue
        scores = gate_scores(q, k, layout, i)
        n = min(slots - 1, scores.shape[-1])
        local = top_blocks(scores, n)
        chosen = torch.where(local >= 0, local + layout.token_first_block[s0:s1, None, None].long(), local)
        out[s0:s1, :, 1 : 1 + n] = chosen.to(torch.int32)
    return out


def _query_tile(heads: int, keys: int) -> int:
    # Keep one tile's score matrix near 2^27 floats (512 MiB) whatever the sequence length.
    return int(max(16, min(4096, 2**27 // max(1, heads * keys))))


def _tiles(q: torch.Tensor, layout: BlockLayout, block_idx: torch.Tensor):
    """Query tiles of each sequence: yields ``(s0, r0, r1, allowed)`` for queries ``s0+r0 .. s0+r1`` (local
    ``r0 .. r1``), with ``allowed [tile, Hq, r1]`` the keys ``s0 .. s0+r1`` each (query, head) attends."""
    hq = q.shape[1]
    cu = layout.cu_seqlens.tolist()
    for i in range(len(cu) - 1):
        s0, s1 = cu[i], cu[i + 1]
        n = s1 - s0
        if n == 0:
            continue
        first = int(layout.token_first_block[s0].item())
        nb_i = (n + layout.chunk_size - 1) // layout.chunk_size
        key_block = torch.arange(n, device=q.device) // layout.chunk_size  # local block of each key
        tile = _query_tile(hq, n)
        for r0 in range(0, n, tile):
            r1 = min(n, r0 + tile)
            # Which local blocks each (query, head) attends: [tile, Hq, nb_i].
            local = block_idx[s0 + r0 : s0 + r1].long() - first
            chosen = torch.zeros(r1 - r0, hq, nb_i + 1, dtype=torch.bool, device=q.device)
            chosen.scatter_(2, torch.where(local >= 0, local, nb_i), True)
            allowed = chosen[:, :, :nb_i][:, :, key_block[:r1]]  # [tile, Hq, keys]
            causal = torch.arange(r1, device=q.device)[None, :] <= torch.arange(r0, r1, device=q.device)[:, None]
            yield s0, r0, r1, allowed & causal[:, None, :]


def _probs(qt, kf, allowed, scale):
    """Scores of a tile, q ``[m, Hkv, G, D]``, keys ``[r1, Hkv, D]`` -> (p ``[m, Hkv, G, r1]``, lse ``[m, Hq]``)."""
    m, hkv, g, _ = qt.shape
    s = torch.einsum("qhgd,khd->qhgk", qt, kf).reshape(m, hkv * g, -1) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse[..., None]).view(m, hkv, g, -1), lse


def moba_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    topk: int,
    softmax_scale: float | None = None,
    block_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoBA attention in float32. q ``[T, Hq, D]``, k/v ``[T, Hkv, D]``.

    Returns ``(out [T, Hq, D] float32, lse [T, Hq] float32)``. ``block_idx`` overrides the gate (used to
    check a kernel's attention on exactly the blocks it chose). Differentiable in q, k and v; the
    selection is computed without gradient.
    """
    t_total, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    if block_idx is None:
        with torch.no_grad():
            block_idx = select_blocks(q, k, layout, topk)
    outs, lses = [], []
    for s0, r0, r1, allowed in _tiles(q, layout, block_idx):
        qt = q[s0 + r0 : s0 + r1].float().view(r1 - r0, hkv, g, d)
        p, lse = _probs(qt, k[s0 : s0 + r1].float(), allowed, scale)
        outs.append(torch.einsum("qhgk,khd->qhgd", p, v[s0 : s0 + r1].float()).reshape(r1 - r0, hq, d))
        lses.append(lse)
    if not outs:  # no tokens (S = 0, T = 0 or B = 0): empty results, as the kernels give, still in the graph
        # so that backward gives q, k and v (empty) gradients
        empty = q.float()[:0] * 0 + (k.float().sum() + v.float().sum()) * 0
        return empty, empty[..., 0]
    return torch.cat(outs, 0), torch.cat(lses, 0)


def moba_attention_naive_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
    block_idx: torch.Tensor, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`moba_attention_naive` on the blocks ``block_idx``, written out (no autograd, so
    it runs inside a custom op): ``dout [T, Hq, D]`` -> dq, dk, dv in float32, shaped like q, k, v."""
    hq, d = q.shape[1:]
    hkv = k.shape[1]
    g = hq // hkv
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for s0, r0, r1, allowed in _tiles(q, layout, block_idx):
        m = r1 - r0
        qt = q[s0 + r0 : s0 + r1].float().view(m, hkv, g, d)
        do = dout[s0 + r0 : s0 + r1].float().view(m, hkv, g, d)
        kf, vf = k[s0 : s0 + r1].float(), v[s0 : s0 + r1].float()
        p, _ = _probs(qt, kf, allowed, softmax_scale)
        dp = torch.einsum("qhgd,khd->qhgk", do, vf)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))  # softmax backward: P * (dP - rowsum(P * dP))
        dv[s0 : s0 + r1] += torch.einsum("qhgk,qhgd->khd", p, do)
        dk[s0 : s0 + r1] += torch.einsum("qhgk,qhgd->khd", ds, qt) * softmax_scale
        dq[s0 + r0 : s0 + r1] = torch.einsum("qhgk,khd->qhgd", ds, kf).reshape(m, hq, d) * softmax_scale
    return dq, dk, dv


def full_attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int], softmax_scale: float | None
) -> torch.Tensor:
    """Dense causal attention in float32, one sequence at a time. Same layout as above, ``cu_seqlens`` a
    host list; ``[T, Hq, D]``."""
    t_total, hq, d = q.shape
    hkv = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    out = torch.empty(t_total, hq, d, dtype=torch.float32, device=q.device)
    cu = cu_seqlens
    for i in range(len(cu) - 1):
        s0, s1 = cu[i], cu[i + 1]
        if s1 == s0:
            continue
        qs, ks, vs = (x[s0:s1].float().transpose(0, 1)[None] for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale, enable_gqa=hq != hkv
        )
        out[s0:s1] = o[0].transpose(0, 1)
    return out
