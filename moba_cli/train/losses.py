"""Per-token training loss with document masking, and the validation pass (loss and loss by position).

:func:`moba_cli.evals.position_loss.token_losses` serves single documents; packed training rows need
``position_ids`` (document masking) and label masks, so the losses are computed here and only the
bucketing rule (:func:`~moba_cli.evals.position_loss.bucket_means`) is shared.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

IGNORE = -100


def token_loss(model: Any, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
               autocast: contextlib.AbstractContextManager | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token losses of a packed batch.

    Args:
        input_ids, labels, position_ids: ``[B, S]``; ``labels`` equal ``input_ids`` or -100 (no loss), and
            ``position_ids`` restart at 0 at every document, which makes attention stop at document ends.

    Returns:
        ``(losses [B, S-1] float32, mask [B, S-1] bool)``: entry ``j`` predicts token ``j + 1``; masked
        entries hold 0.
    """
    with autocast or contextlib.nullcontext():
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    targets = labels[:, 1:]
    mask = targets != IGNORE
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets.clamp_min(0), reduction="none"
    )
    return losses * mask, mask


@torch.no_grad()
def evaluate(model: Any, batches: list[Any], buckets: int, device: torch.device, autocast: Any,
             reduce: Any) -> dict[str, Any]:
    """Mean validation loss and its mean by position bucket over ``batches`` (summed over ranks by ``reduce``).

    Buckets split the row positions ``1..S-1`` evenly (see :func:`moba_cli.evals.position_loss.bucket_means`);
    rows of long documents make the last buckets the trailing-token loss.
    """
    from moba_cli.evals.position_loss import bucket_means

    was_training = model.training
    model.eval()
    all_losses, all_masks = [], []
    for b in batches:
        losses, mask = token_loss(model, b.input_ids.to(device), b.labels.to(device), b.position_ids.to(device),
                                  autocast)
        all_losses.append(losses.float())
        all_masks.append(mask.float())
    model.train(was_training)
    losses, masks = torch.cat(all_losses), torch.cat(all_masks)
    rows = losses.shape[0]
    buckets = min(buckets, losses.shape[1])
    # Per-bucket sums and counts: bucket_means times the bucket's number of entries.
    sums = torch.tensor(bucket_means(losses, buckets), dtype=torch.float64, device=device)
    counts = torch.tensor(bucket_means(masks, buckets), dtype=torch.float64, device=device)
    totals = torch.tensor([losses.sum().item(), masks.sum().item(), rows], dtype=torch.float64, device=device)
    reduce(sums)
    reduce(counts)
    reduce(totals)
    by_pos = [(s / c).item() if c > 0 else None for s, c in zip(sums, counts, strict=True)]
    return {"val_loss": (totals[0] / totals[1]).item() if totals[1] > 0 else None,
            "val_tokens": int(totals[1].item()), "val_loss_by_position": by_pos}
