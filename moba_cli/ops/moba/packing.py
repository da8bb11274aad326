"""Sequences packed along the rows of a batch, found from their ``position_ids``.

Inside a sequence the positions step by one (``p, p+1, ...``); wherever they do not, a new sequence
starts (a packed document restarting at 0, say). :func:`sequence_starts` is that rule, and the only copy
of it: a fixed-shape tensor function, so ``torch.compile`` traces it without reading any value. Eager
calls turn its result into ``cu_seqlens`` here (:func:`packed_cu_seqlens`, cached per tensor); a traced
graph hands the per-token starts to the custom ops, which read the offsets inside their real
implementation (:func:`split_cu_seqlens`), where a data-dependent size breaks no graph.
"""

from __future__ import annotations

from typing import Any

import torch


def sequence_starts(position_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """bool ``[B, L]`` of ``position_ids [B or 1, L]``: True at every row's first token and wherever the
    position does not step by one from the token before."""
    pos = position_ids.expand(batch, -1)
    first = torch.ones_like(pos[:, :1], dtype=torch.bool)
    return torch.cat([first, pos[:, 1:] != pos[:, :-1] + 1], 1)


def any_packed(starts: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: whether any row of :func:`sequence_starts`' ``[B, L]`` holds several sequences."""
    return starts[:, 1:].any()


def cu_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """int32 ``cu_seqlens [n+1]`` of a flat ``starts [T]`` whose first entry is True: one sequence from
    each True up to the next."""
    idx = torch.nonzero(starts).flatten()
    return torch.cat([idx, idx.new_full((1,), starts.numel())]).to(torch.int32)


def split_cu_seqlens(cu_seqlens: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens [n+1]`` with its sequences also split where the flat ``starts [T]`` is True (reads the
    values: for the custom ops' real implementations). Empty sequences drop out; they hold no token."""
    if starts.numel() == 0:
        return cu_seqlens
    mark = starts.clone()
    heads = cu_seqlens[:-1].long()
    mark[heads[heads < mark.numel()]] = True
    return cu_from_starts(mark)


# Every layer of one model forward gets the same position tensor: find the offsets (one host sync) once.
# The version counter catches in-place edits of a reused tensor.
_cache: dict[str, Any] = {"pos": None, "key": None, "cu": None}


def packed_cu_seqlens(position_ids: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor | None:
    """int32 ``cu_seqlens`` on ``device`` of the ``batch * L`` tokens, split at every row and every
    :func:`sequence_starts` start; None when each row holds one sequence (the unpacked fast path)."""
    key = (position_ids._version, batch, device)
    if _cache["pos"] is position_ids and _cache["key"] == key:
        return _cache["cu"]
    starts = sequence_starts(position_ids, batch)
    cu = cu_from_starts(starts.flatten()).to(device) if bool(any_packed(starts)) else None
    _cache.update(pos=position_ids, key=key, cu=cu)
    return cu
