"""What a transformers attention call says about padding and packing, as the MoBA kernels need it.

A padding mask (left or right) becomes per-row spans of real tokens; a flattening collator's
``cu_seq_lens_q`` becomes ``cu_seqlens``; per-row ``position_ids`` go to the attention functions as they
are (:mod:`moba_cli.ops.moba.packing` finds the packed sequences, also inside a ``torch.compile`` graph).
Either way blocks restart at every sequence's first real token. Every layer of one forward gets the same
mask and position tensors, so the derived values are cached per tensor (one host sync per forward, not
per layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from moba_cli.errors import MobaError


def padding_mask(*, kv_length: int, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """Mask builder registered for ``moba``: like flash-attention, keep only the 2-D padding mask.

    Returns ``attention_mask[:, -kv_length:]`` as bool, or None when nothing is padded. Causality and the
    block structure are the kernels' business. transformers passes keywords only; the other ones
    (``q_length`` or ``cache_position``, offsets, ``mask_function``, ...) differ between releases.
    """
    if attention_mask is None:
        return None
    m = attention_mask[:, -kv_length:].bool()
    if m.shape[1] == kv_length and bool(m.all()):
        return None
    return m


@dataclass
class Spans:
    """Per-row ``[start, end)`` of real tokens along the key axis (``L`` positions)."""

    starts: list[int]
    ends: list[int]
    valid: torch.Tensor | None = field(default=None, repr=False)  # [B, L] bool, when a mask was given

    @property
    def lengths(self) -> list[int]:
        return [e - s for s, e in zip(self.starts, self.ends, strict=True)]


_span_cache: dict[str, Any] = {"mask": None, "version": None, "spans": None}


def row_spans(mask: torch.Tensor | None, batch: int, length: int) -> Spans | None:
    """Real-token spans from the padding mask transformers passed; None when nothing is padded.

    ``mask``: None, a 2-D ``[B, L]`` padding mask (bool or 0/1), or a 4-D ``[B, 1, q, L]`` mask (bool, or
    additive float with large negatives) whose last query row is read as the padding mask. Every row's
    real tokens must be contiguous (left or right padding).
    """
    if mask is None:
        return None
    # All layers of one forward share the mask object: derive the spans (one host sync) once. The
    # version counter catches in-place edits of a reused mask.
    if _span_cache["mask"] is mask and _span_cache["version"] == mask._version:
        return _span_cache["spans"]
    if mask.dim() == 4:
        row = mask[:, 0, -1, :]
        valid = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    elif mask.dim() == 2:
        valid = mask.bool()
    else:
        raise MobaError(f"MoBA attention got a {mask.dim()}-D attention mask; expected a 2-D padding mask")
    if valid.shape[0] == 1 and batch > 1:  # one mask row broadcast over the batch
        valid = valid.expand(batch, -1)
    if valid.shape[0] != batch or valid.shape[1] != length:
        raise MobaError(
            f"the attention mask covers {tuple(valid.shape)} (batch, keys) but the keys are {(batch, length)}; "
            "MoBA needs the default dynamic KV cache (static/offloaded caches are not supported)"
        )
    n = valid.sum(1)
    first = valid.int().argmax(1)
    last = length - 1 - valid.flip(1).int().argmax(1)
    counts, firsts, lasts = torch.stack([n, first, last]).tolist()
    starts, ends = [], []
    for c, f, la in zip(counts, firsts, lasts, strict=True):
        if c == 0:
            starts.append(length)
            ends.append(length)
            continue
        if la - f + 1 != c:
            raise MobaError(
                "MoBA attention needs each row's real tokens to be contiguous (left or right padding); "
                "the attention mask has holes"
            )
        starts.append(f)
        ends.append(la + 1)
    spans = Spans(starts, ends, valid)
    if all(s == 0 for s in starts) and all(e == length for e in ends):
        spans = None
    _span_cache.update(mask=mask, version=mask._version, spans=spans)
    return spans


def row_positions(position_ids: Any, length: int) -> torch.Tensor | None:
    """The ``position_ids`` transformers passed when they are per-row positions ``[B or 1, L]``, which the
    attention functions split packed rows by (:func:`moba_cli.moba_attention`); else None (none given,
    or another layout such as multimodal rotary positions ``[3, B, L]``)."""
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[-1] == length:
        return position_ids
    return None


def given_cu_seqlens(kwargs: dict[str, Any], b: int, s: int, device: torch.device) -> torch.Tensor | None:
    """cu_seqlens passed by a flattening data collator (``cu_seq_lens_q``), for one packed row."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if not isinstance(cu_q, torch.Tensor):
        return None
    if isinstance(cu_k, torch.Tensor) and not torch.equal(cu_q.cpu(), cu_k.cpu()):
        raise MobaError("MoBA attention needs cu_seq_lens_q == cu_seq_lens_k (self-attention)")
    if int(cu_q[-1]) != b * s:
        raise MobaError(f"cu_seq_lens_q ends at {int(cu_q[-1])} but the batch has {b * s} tokens")
    return cu_q.to(device=device, dtype=torch.int32)
