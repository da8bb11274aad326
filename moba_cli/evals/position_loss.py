"""Language-model loss by position: the paper's trailing-token view (MoBA's weak spot is late tokens)."""

from __future__ import annotations

from typing import Any

import torch


def token_losses(model: Any, input_ids: torch.Tensor, *, chunk_rows: int = 4096) -> torch.Tensor:
    """Next-token negative log-likelihood of every position.

    Args:
        model: a transformers causal LM (any attention implementation).
        input_ids: ``[B, S]`` token ids.
        chunk_rows: positions whose logits are materialised at once (bounds the ``[rows, vocab]`` buffer).

    Returns:
        float32 ``[B, S - 1]``: entry ``j`` is the loss of predicting token ``j + 1`` from tokens ``0..j``.
    """
    out = model(input_ids=input_ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1]  # [B, S, H], after the final norm in transformers' causal LMs
    head = model.get_output_embeddings()
    b, s = input_ids.shape
    losses = torch.empty(b, max(s - 1, 0), dtype=torch.float32, device=input_ids.device)
    for lo in range(0, s - 1, chunk_rows):
        hi = min(lo + chunk_rows, s - 1)
        logits = head(hidden[:, lo:hi]).float()
        if getattr(model.config, "final_logit_softcapping", None):
            cap = model.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        losses[:, lo:hi] = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), input_ids[:, lo + 1 : hi + 1], reduction="none"
        )
    return losses


def bucket_means(losses: torch.Tensor, buckets: int) -> list[float]:
    """Mean loss in ``buckets`` equal-width position buckets (the last bucket takes the remainder).

    Args:
        losses: ``[B, L]`` per-position losses (e.g. from :func:`token_losses`).
        buckets: number of buckets, ``1 <= buckets <= L``.

    Returns:
        ``buckets`` floats, bucket ``i`` covering positions ``[i*L//buckets, (i+1)*L//buckets)``.
    """
    n = losses.shape[-1]
    if not 1 <= buckets <= max(n, 1):
        raise ValueError(f"buckets must be between 1 and {n}, got {buckets}")
    edges = [i * n // buckets for i in range(buckets + 1)]
    return [losses[..., a:b].float().mean().item() for a, b in zip(edges[:-1], edges[1:], strict=True)]
