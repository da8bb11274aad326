"""``moba eval loss``: next-token loss by position bucket over long held-out documents, MoBA beside full.

The paper's trailing-token view: MoBA reads fewer far blocks, so any loss it pays shows up late in a long
sequence. Documents are consecutive windows of ``seq`` tokens of the data (stdlib source for ``code``, or a
user file), each starting with the tokenizer's special prefix (BOS), so every window is a proper sequence.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moba_cli.errors import MobaError
from moba_cli.evals import model as m
from moba_cli.evals.haystack import describe, haystack_tokens
from moba_cli.evals.position_loss import bucket_means, token_losses

Tick = Callable[[int, str], None]


@dataclass
class LossConfig:
    data: str = "code"
    seq: int = 32768
    buckets: int = 8
    docs: int = 1


def documents(lm: m.LoadedModel, cfg: LossConfig) -> torch.Tensor:
    """``[docs, seq]`` token ids: consecutive windows of the data, each led by the special prefix."""
    if cfg.seq < 2:
        raise MobaError(f"--seq must be at least 2 tokens, got {cfg.seq}")
    if not 1 <= cfg.buckets <= cfg.seq - 1:
        raise MobaError(f"--buckets must be between 1 and {cfg.seq - 1} (the predicted tokens), got {cfg.buckets}")
    if cfg.docs < 1:
        raise MobaError(f"--docs must be at least 1, got {cfg.docs}")
    special = m.special_prefix(lm.tokenizer)
    body = cfg.seq - len(special)
    ids = haystack_tokens(lm.tokenizer, cfg.data, body * cfg.docs, repeat=False).ids
    if max(ids) >= lm.vocab_size():
        raise MobaError(f"the tokenizer makes ids up to {max(ids)} but the model's vocabulary has {lm.vocab_size()}")
    rows = [special + ids[i * body : (i + 1) * body] for i in range(cfg.docs)]
    return torch.tensor(rows, dtype=torch.long)


def run_loss(lm: m.LoadedModel, cfg: LossConfig, attns: list[str], tick: Tick | None = None) -> tuple[list, dict]:
    """Loss per position bucket for each attention. Returns ``(records, summary)``.

    Records: one per (attn, bucket) with ``start``/``end`` (loss positions: bucket ``[start, end)`` holds the
    predictions of tokens ``start+1 .. end``), ``loss`` (mean nats) and ``ppl``. An OOM for an attention is
    recorded as one ``status: "oom"`` record and the other attention still runs.
    """
    tick = tick or (lambda n, d: None)
    docs = documents(lm, cfg)
    n = cfg.seq - 1
    edges = [i * n // cfg.buckets for i in range(cfg.buckets + 1)]
    records: list[dict[str, Any]] = []
    means: dict[str, float] = {}
    for attn in attns:
        t0 = time.perf_counter()
        losses = []
        if attn == "moba":
            m.reset_calls(lm)
        try:
            with m.attention(lm, attn), torch.no_grad():
                for d in range(docs.shape[0]):
                    losses.append(token_losses(lm.model, docs[d : d + 1].to(lm.device)).cpu())
                    tick(1, f"{attn}: document {d + 1}/{docs.shape[0]}")
        except Exception as e:  # noqa: BLE001 - an OOM is recorded; anything else propagates
            if not m.is_oom(e):
                raise
            m.free_memory(lm.device)
            records.append({"attn": attn, "status": "oom", "error": str(e).splitlines()[0][:200]})
            continue
        all_losses = torch.cat(losses)  # [docs, seq - 1]
        calls = m.moba_calls(lm) if attn == "moba" else None
        for b, value in enumerate(bucket_means(all_losses, cfg.buckets)):
            rec = {"attn": attn, "status": "ok", "bucket": b, "start": edges[b], "end": edges[b + 1],
                   "loss": value, "ppl": math.exp(min(value, 80.0))}
            if calls is not None:
                rec["moba_calls"] = calls
            records.append(rec)
        means[attn] = float(all_losses.mean())
        means[f"{attn}_seconds"] = round(time.perf_counter() - t0, 3)
    summary: dict[str, Any] = {"mean_loss": means, "tokens_per_doc": cfg.seq, "docs": int(docs.shape[0]),
                               "data": describe(cfg.data)}
    ok = {a for a in attns if a in means}
    if ok == {"moba", "full"}:
        lm_, lf = ([r["loss"] for r in records if r.get("attn") == a and r["status"] == "ok"] for a in ("moba", "full"))
        summary["moba_minus_full"] = [a - b for a, b in zip(lm_, lf, strict=True)]
        summary["last_bucket_moba_minus_full"] = lm_[-1] - lf[-1]
    return records, summary
