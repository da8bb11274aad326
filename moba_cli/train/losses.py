"""Per-token training loss with document masking, the validation pass (loss and loss by position), and
the copy probe (does the model copy a passage it has seen: the induction heads retrieval rests on).

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


def copy_probe(vocab: int, seq_len: int, rows: int, special: set[int], bos: int | None = None,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of random token ids in which one passage appears twice, at a distance drawn per row.

    Random ids leave nothing to predict but the copy, and a random distance leaves nothing to copy by
    position: the second copy's loss falls below the first's only when the model finds the passage by
    content. Returns ``(input_ids [rows, S], part [rows, S])`` with ``S = seq_len``; ``part`` is 1 on the
    first copy, 2 on the second, 0 elsewhere; position 0 holds ``bos`` (when given) and no id of
    ``special`` appears elsewhere.
    """
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
    ids = allowed[torch.randint(len(allowed), (rows, seq_len), generator=g)]
    part = torch.zeros(rows, seq_len, dtype=torch.long)
    n = max(2, min(256, (seq_len - 1) // 4))  # passage length
    for r in range(rows):
        first = 1 + int(torch.randint(seq_len - 1 - 2 * n + 1, (), generator=g))
        second = first + n + int(torch.randint(seq_len - first - 2 * n + 1, (), generator=g))
        ids[r, second:second + n] = ids[r, first:first + n]
        part[r, first:first + n], part[r, second:second + n] = 1, 2
    if bos is not None:
        ids[:, 0] = bos
    return ids, part


@torch.no_grad()
def copy_losses(model: Any, probe: tuple[torch.Tensor, torch.Tensor], device: torch.device,
                autocast: Any = None) -> dict[str, float]:
    """Mean next-token loss on the probe's first and second copies (each copy's first token left out: it
    cannot be predicted). A model that copies by content has ``val_copy_loss_second`` far below
    ``val_copy_loss_first`` (ln of the vocabulary or more: random ids are unlike any data)."""
    ids, part = probe
    pos = torch.arange(ids.shape[1], device=device)[None]
    # entry j predicts token j + 1; count it when tokens j and j + 1 are in the same copy
    sel = [(part[:, 1:] == k) & (part[:, :-1] == k) for k in (1, 2)]
    was_training = model.training
    model.eval()
    rows = []
    for r in range(ids.shape[0]):  # one row at a time: a row's float32 logits are S x vocab
        row = ids[r:r + 1].to(device)
        rows.append(token_loss(model, row, row, pos, autocast)[0][0].double().cpu())
    model.train(was_training)
    losses = torch.stack(rows)
    first, second = (float(losses[m].sum() / m.sum().clamp_min(1)) for m in sel)
    return {"val_copy_loss_first": first, "val_copy_loss_second": second}
