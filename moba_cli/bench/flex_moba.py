"""MoBA written with stock PyTorch: the gate in torch ops, attention through FlexAttention.

This is what a user could build without our kernels, and the bench times all of it per call: block means,
the per-query top-k choice, a bit set of chosen blocks, the :class:`BlockMask`, and the compiled
``flex_attention`` call. It computes exactly MoBA:

* the choice is per query and per query head (``bits [B, Hq, S, words]``, bit ``n`` of a query's words is
  set when it chose past block ``n``); ``mask_mod`` reads it, so no ``S x S`` mask is ever built;
* the BlockMask works on tiles of 128 queries x one MoBA block of keys: a tile lists the union of the
  blocks its queries chose (plus their own blocks); blocks chosen by *every* query of the tile are "full"
  (``mask_mod`` is skipped there), the rest are partial and ``mask_mod`` decides per (query, key);
* top-k ranks an integer key built from the float32 score and the block index, so among equal scores the
  earlier block wins, exactly as the reference does.
"""

from __future__ import annotations

import torch

Q_TILE = 128  # queries per BlockMask row tile
_WORD = 32  # chosen-block bits per int32 word
_INT64_MIN = -(2**63)
_TILE_BYTES = 2**29  # int64 ranking keys per selection tile (512 MiB)


def _ordered_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys that sort like (score desc, block index asc). scores ``[..., nb]`` float32, -inf = not eligible."""
    nb = scores.shape[-1]
    s = scores + 0.0  # turns -0.0 into +0.0 so both rank the same
    raw = s.view(torch.int32).to(torch.int64)
    ordered = torch.where(raw >= 0, raw, raw ^ 0x7FFFFFFF)  # monotone in the float value
    index = torch.arange(nb, device=scores.device, dtype=torch.int64)
    keys = (ordered << 32) | (nb - 1 - index)
    return keys.masked_fill(torch.isinf(scores) & (scores < 0), _INT64_MIN)


def _to_int32_words(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> the int32 with the same 32 bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@torch.no_grad()
def moba_block_mask_inputs(q: torch.Tensor, k: torch.Tensor, chunk: int, topk: int, bits: torch.Tensor):
    """Choose blocks for every query and fill ``bits``; return the BlockMask's tile lists.

    q ``[B, S, Hq, D]``, k ``[B, S, Hkv, D]`` with ``S % chunk == 0`` and ``S % 128 == 0``; bits
    ``[B, Hq, S, W]`` int32 (written). Returns ``(kv_num, kv_idx, full_num, full_idx)``: int32
    ``[B, Hq, S/128]`` and ``[B, Hq, S/128, nb]``.
    """
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    nb = s // chunk
    n_sel = min(topk - 1, nb)
    means = k.view(b, nb, chunk, hkv, d).sum(2, dtype=torch.float32) / chunk  # [B, nb, Hkv, D]
    qt_count = s // Q_TILE
    partial = torch.zeros(b, hq, qt_count, nb, dtype=torch.bool, device=q.device)
    full = torch.zeros_like(partial)
    rows = max(Q_TILE, (_TILE_BYTES // max(1, b * hq * nb * 8)) // Q_TILE * Q_TILE)
    blocks = torch.arange(nb, device=q.device)
    for r0 in range(0, s, rows):
        r1 = min(s, r0 + rows)
        t = r1 - r0
        pos = torch.arange(r0, r1, device=q.device)
        own = pos // chunk
        chosen = torch.zeros(b, hq, t, nb + 1, dtype=torch.bool, device=q.device)
        chosen.scatter_(3, own.view(1, 1, t, 1).expand(b, hq, t, 1), True)
        if n_sel > 0:
            qf = q[:, r0:r1].float().view(b, t, hkv, g, d)
            scores = torch.einsum("bthgd,bnhd->bhgtn", qf, means).reshape(b, hq, t, nb)
            scores = scores.masked_fill(~(blocks[None, :] < own[:, None]), float("-inf"))
            keys = _ordered_keys(scores)
            del scores, qf
            top = keys.topk(n_sel, dim=-1)
            idx = torch.where(top.values > _INT64_MIN, top.indices, nb)  # nb: "no block" (too few past blocks)
            del keys, top
            chosen.scatter_(3, idx, True)
            words = torch.zeros(b, hq, t, bits.shape[-1] + 1, dtype=torch.int64, device=q.device)
            word_of = torch.where(idx < nb, idx // _WORD, bits.shape[-1])
            words.scatter_add_(3, word_of, torch.ones_like(idx) << (idx % _WORD))  # distinct bits: sum == or
            bits[:, :, r0:r1] = _to_int32_words(words[..., :-1])
            del words, word_of, idx
        else:
            bits[:, :, r0:r1] = 0
        tiles = chosen[..., :nb].view(b, hq, t // Q_TILE, Q_TILE, nb)
        any_q, all_q = tiles.any(dim=3), tiles.all(dim=3)
        first_own = own[::Q_TILE].view(1, 1, -1, 1)  # smallest own block of each tile
        tile_full = all_q & (blocks.view(1, 1, 1, nb) < first_own)  # chosen by all, wholly in the past
        full[:, :, r0 // Q_TILE : r1 // Q_TILE] = tile_full
        partial[:, :, r0 // Q_TILE : r1 // Q_TILE] = any_q & ~tile_full
        del chosen, tiles
    return (*_ordered(partial), *_ordered(full))


def _ordered(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense tile mask ``[..., nb]`` -> (count ``[...]``, indices ``[..., nb]`` with the listed blocks first)."""
    num = mask.sum(dim=-1, dtype=torch.int32)
    idx = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num, idx


def make_mask_mod(bits: torch.Tensor, chunk: int):
    """``mask_mod`` for partial tiles: a chosen past block, or the own block up to the query."""

    def moba_mask(b, h, q_idx, kv_idx):
        kb = kv_idx // chunk
        qb = q_idx // chunk
        word = bits[b, h, q_idx, kb // _WORD]
        chosen = ((word >> (kb % _WORD)) & 1) == 1
        return (chosen & (kb < qb)) | ((kb == qb) & (kv_idx <= q_idx))

    return moba_mask


def num_words(seq: int, chunk: int) -> int:
    return max(1, (seq // chunk + _WORD - 1) // _WORD)


def build_block_mask(q: torch.Tensor, k: torch.Tensor, chunk: int, topk: int, bits: torch.Tensor, mask_mod):
    """The MoBA BlockMask of q ``[B, S, Hq, D]``, k ``[B, S, Hkv, D]``; fills ``bits`` for ``mask_mod``."""
    from torch.nn.attention.flex_attention import BlockMask

    from moba_cli.bench.check import exact_float32

    with exact_float32():  # a TF32 gate would pick other blocks than MoBA's float32 gate
        kv_num, kv_idx, full_num, full_idx = moba_block_mask_inputs(q, k, chunk, topk, bits)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(Q_TILE, chunk),
                                    mask_mod=mask_mod)


_COMPILED = {}


def flex_attention_fn(compiled: bool):
    """``flex_attention`` compiled with ``torch.compile`` (CUDA), or eager (unfused, small sizes only: CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "fn" not in _COMPILED:
        import torch._dynamo

        # Every new shape compiles once; allow enough of them that no shape silently falls back to eager.
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))
        # Default (automatic) dynamic shapes: a second sequence length recompiles once with a symbolic
        # length instead of once per length, which saves minutes of compilation in a sweep.
        _COMPILED["fn"] = torch.compile(flex_attention)
    return _COMPILED["fn"]


def flex_moba(q, k, v, chunk: int, topk: int, bits: torch.Tensor, mask_mod, compiled: bool) -> torch.Tensor:
    """MoBA attention with FlexAttention. q ``[B, S, Hq, D]``, k/v ``[B, S, Hkv, D]`` -> ``[B, S, Hq, D]``."""
    block_mask = build_block_mask(q.detach(), k.detach(), chunk, topk, bits, mask_mod)
    fn = flex_attention_fn(compiled)
    o = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
           enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)
