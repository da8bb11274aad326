"""Block layout of (possibly packed) sequences: which keys form which block, which block each query is in.

Every backend works on the packed layout: q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` with ``cu_seqlens [n+1]``.
A padded batch ``[B, S, H, D]`` is the packed layout with ``cu_seqlens = [0, S, 2S, ...]``. Blocks are
numbered globally across sequences: sequence ``i`` owns blocks ``block_offsets[i] .. block_offsets[i+1]-1``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockLayout:
    """Per-block and per-token indices, all int32 on the tensors' device.

    Attributes:
        cu_seqlens: ``[n+1]`` token offsets of each sequence.
        block_start: ``[NB]`` first key position of each global block.
        block_end: ``[NB]`` one past the last key position of each global block.
        token_block: ``[T]`` global block of each token (its own block).
        token_first_block: ``[T]`` first global block of the token's sequence.
        num_blocks: ``NB``, total blocks over all sequences.
        max_blocks: most blocks in any one sequence.
        chunk_size: keys per block (the last block of a sequence may be shorter).
    """

    cu_seqlens: torch.Tensor
    block_start: torch.Tensor
    block_end: torch.Tensor
    token_block: torch.Tensor
    token_first_block: torch.Tensor
    num_blocks: int
    max_blocks: int
    chunk_size: int


def make_layout(cu_seqlens: torch.Tensor, chunk_size: int, cu_host: list[int] | None = None) -> BlockLayout:
    """Build the block layout of packed sequences ``cu_seqlens [n+1]`` (int32, increasing).

    ``cu_host``: the same offsets as a host list, when the caller has them; then nothing waits for the GPU.
    """
    device = cu_seqlens.device
    cu = cu_seqlens.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    nblocks = (lens + chunk_size - 1) // chunk_size
    boff = torch.zeros(len(lens) + 1, dtype=torch.int64, device=device)
    boff[1:] = torch.cumsum(nblocks, 0)
    if cu_host is not None:
        host_blocks = [-(-(b - a) // chunk_size) for a, b in zip(cu_host[:-1], cu_host[1:], strict=True)]
        nb_total, max_blocks = sum(host_blocks), max(host_blocks, default=0)
    else:
        nb_total = int(boff[-1].item())
        max_blocks = int(nblocks.max().item()) if len(lens) else 0
    seq_ids = torch.arange(len(lens), device=device)
    block_seq = torch.repeat_interleave(seq_ids, nblocks, output_size=nb_total)
    local = torch.arange(nb_total, device=device) - boff[block_seq]
    block_start = cu[block_seq] + local * chunk_size
    block_end = torch.minimum(block_start + chunk_size, cu[block_seq + 1])
    total = cu_host[-1] if cu_host is not None else int(cu[-1].item())
    token_seq = torch.repeat_interleave(seq_ids, lens, output_size=total)
    token_local = torch.arange(total, device=device) - cu[token_seq]
    token_block = boff[token_seq] + token_local // chunk_size
    return BlockLayout(
        cu_seqlens=cu_seqlens.to(torch.int32),
        block_start=block_start.to(torch.int32),
        block_end=block_end.to(torch.int32),
        token_block=token_block.to(torch.int32),
        token_first_block=boff[token_seq].to(torch.int32),
        num_blocks=nb_total,
        max_blocks=max_blocks,
        chunk_size=chunk_size,
    )


_CACHE: OrderedDict[tuple, BlockLayout] = OrderedDict()
CACHE_SIZE = 4


def cached_layout(cu_host: list[int], chunk_size: int, device: torch.device) -> BlockLayout:
    """:func:`make_layout` for host offsets, remembered for the last ``CACHE_SIZE`` shapes: a training or
    benchmark loop calls with the same lengths every step, and rebuilding the layout costs a few
    launches over all tokens each time. The layout's tensors are read-only to every caller."""
    key = (str(device), chunk_size, tuple(cu_host))
    layout = _CACHE.get(key)
    if layout is None:
        cu = torch.tensor(cu_host, dtype=torch.int32, device=device)
        layout = _CACHE[key] = make_layout(cu, chunk_size, cu_host)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return layout


def clear_layout_cache() -> None:
    """Drop the remembered layouts (their index tensors hold 8 bytes per token on the device)."""
    _CACHE.clear()


def num_slots(topk: int, max_blocks: int) -> int:
    """Blocks each query attends at most: its own block plus ``topk - 1`` past blocks, capped by the
    number of blocks the longest sequence has."""
    return max(1, min(topk, max_blocks))


def decode_slots(topk: int, cache_len: int, chunk_size: int) -> int:
    """Blocks per head in decode's ``block_ids``: own block plus ``topk - 1``, capped by the cache's block
    count."""
    return max(1, min(topk, -(-cache_len // chunk_size)))
