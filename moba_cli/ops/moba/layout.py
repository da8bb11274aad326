"""Block layout of (possibly packed) sequences: which keys form which block, which block each query is in.

Every backend works on the packed layout: q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` with ``cu_seqlens [n+1]``.
A padded batch ``[B, S, H, D]`` is the packed layout with ``cu_seqlens = [0, S, 2S, ...]``. Blocks are
numbered globally across sequences: sequence ``i`` owns blocks ``block_offsets[i] .. block_offsets[i+1]-1``.
"""

from __future__ import annotations

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


def make_layout(cu_seqlens: torch.Tensor, chunk_size: int) -> BlockLayout:
    """Build the block layout of packed sequences ``cu_seqlens [n+1]`` (int32, increasing)."""
    device = cu_seqlens.device
    cu = cu_seqlens.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    nblocks = (lens + chunk_size - 1) // chunk_size
    boff = torch.zeros(len(lens) + 1, dtype=torch.int64, device=device)
    boff[1:] = torch.cumsum(nblocks, 0)
    nb_total = int(boff[-1].item())
    max_blocks = int(nblocks.max().item()) if len(lens) else 0
    seq_ids = torch.arange(len(lens), device=device)
    block_seq = torch.repeat_interleave(seq_ids, nblocks, output_size=nb_total)
    local = torch.arange(nb_total, device=device) - boff[block_seq]
    block_start = cu[block_seq] + local * chunk_size
    block_end = torch.minimum(block_start + chunk_size, cu[block_seq + 1])
    total = int(cu[-1].item())
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


def num_slots(topk: int, max_blocks: int) -> int:
    """Blocks each query attends at most: its own block plus ``topk - 1`` past blocks, capped by the
    number of blocks the longest sequence has."""
    return max(1, min(topk, max_blocks))
