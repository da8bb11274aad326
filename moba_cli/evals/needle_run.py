"""Run the needle grid: lengths x depths x attentions, batched to a token budget, resumable, OOM-tolerant."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from moba_cli.errors import MobaError
from moba_cli.evals import model as m
from moba_cli.evals.haystack import haystack_tokens
from moba_cli.evals.needle import Templates, make_samples, max_fixed_tokens, score_batch
from moba_cli.evals.state import PartialRun

Tick = Callable[[int, str], None]  # (samples done, description)


@dataclass
class NeedleConfig:
    lengths: list[int]
    depths: list[float]
    samples: int = 4
    haystack: str = "noise"
    templates: Templates = field(default_factory=Templates)
    distractors: int = 9
    seed: int = 0
    max_batch_tokens: int = 65536
    gen_extra: int = 8  # greedy tokens beyond the value's own length

    def settings(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("max_batch_tokens")  # how cells are batched does not change their results
        return d


def cell_record(attn: str, length: int, depth: float, rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """One grid cell: the means of its samples' scores and the samples themselves."""
    n = len(rows)
    rec: dict[str, Any] = {"attn": attn, "length": length, "depth": depth, "status": "ok", "samples": n}
    if n:
        rec.update(
            exact=sum(r["exact"] for r in rows) / n,
            rank1=sum(r["rank"] == 1 for r in rows) / n,
            mean_rank=sum(r["rank"] for r in rows) / n,
            logprob=sum(r["logprob"] for r in rows) / n,
            margin=sum(r["margin"] for r in rows) / n,
        )
    rec.update(extra)
    rec["per_sample"] = rows
    return rec


def _score_cell(lm: m.LoadedModel, samples: list, batch: int, gen: int, tick: Tick, desc: str) -> list[dict]:
    """Score the samples in batches of ``batch``; on OOM halve the batch and retry (raises at batch 1)."""
    rows: list[dict[str, Any]] = []
    i = 0
    while i < len(samples):
        part = samples[i : i + batch]
        try:
            rows.extend(score_batch(lm.model, lm.tokenizer, part, gen))
        except Exception as e:  # noqa: BLE001 - only OOM is handled; anything else propagates
            if not m.is_oom(e) or batch == 1:
                raise
            m.free_memory(lm.device)
            batch = max(1, batch // 2)
            continue
        i += len(part)
        tick(len(part), desc)
    return rows


def prepare(lm: m.LoadedModel, cfg: NeedleConfig) -> tuple[list[int], list[int], list[str]]:
    """Check the grid against the tokenizer and make the haystack: ``(special prefix, haystack, notes)``."""
    special = m.special_prefix(lm.tokenizer)
    fixed = max_fixed_tokens(lm.tokenizer, cfg.templates, special)
    short = [n for n in cfg.lengths if n <= fixed]
    if short:
        raise MobaError(f"--lengths {', '.join(map(str, short))} leave no room for a haystack (preamble, needle "
                        f"and question take about {fixed} tokens)")
    hay = haystack_tokens(lm.tokenizer, cfg.haystack, max(cfg.lengths))
    vocab = lm.vocab_size()
    if max(hay.ids) >= vocab:
        raise MobaError(f"the tokenizer makes ids up to {max(hay.ids)} but the model's vocabulary has {vocab}")
    return special, hay.ids, list(hay.notes) + m.length_notes(lm, cfg.lengths)


def run_needle(
    lm: m.LoadedModel,
    cfg: NeedleConfig,
    attns: list[str],
    state: PartialRun,
    tick: Tick | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every cell of the grid for every attention in ``attns``; finished cells come from ``state``.

    Returns ``(records, notes)``: one record per (attn, length, depth), in grid order.
    """
    tick = tick or (lambda n, d: None)
    special, hay, notes = prepare(lm, cfg)
    records = []
    for length in sorted(cfg.lengths):
        batch = max(1, min(cfg.samples, cfg.max_batch_tokens // length))
        for depth in cfg.depths:
            samples = None
            for attn in attns:
                if state.has(attn, length, depth):
                    records.append(state.done[(attn, length, depth)])
                    tick(cfg.samples, f"{attn} {length} tokens, depth {depth:g}% (resumed)")
                    continue
                if samples is None:
                    samples = make_samples(lm.tokenizer, cfg.templates, hay, special, length, depth,
                                           cfg.samples, cfg.seed, cfg.distractors)
                gen = max(len(s.candidates[0]) for s in samples) + cfg.gen_extra
                desc = f"{attn} {length} tokens, depth {depth:g}%"
                t0 = time.perf_counter()
                if attn == "moba":
                    m.reset_calls(lm)
                try:
                    with m.attention(lm, attn):
                        rows = _score_cell(lm, samples, batch, gen, tick, desc)
                except Exception as e:  # noqa: BLE001 - an OOM is recorded for this cell; the run goes on
                    if not m.is_oom(e):
                        raise
                    m.free_memory(lm.device)
                    rec = cell_record(attn, length, depth, [], status="oom", error=str(e).splitlines()[0][:200])
                    tick(cfg.samples, desc + " (out of memory)")
                else:
                    extra: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 3)}
                    if attn == "moba":
                        extra["moba_calls"] = m.moba_calls(lm)
                    rec = cell_record(attn, length, depth, rows, **extra)
                rec["beyond_trained_positions"] = bool(lm.max_positions and length > lm.max_positions)
                state.add(rec)
                records.append(rec)
    return records, notes


def summarize(records: list[dict[str, Any]], attns: list[str], lengths: list[int]) -> dict[str, Any]:
    """Headline numbers: per attention, the mean scores overall and per length (OOM cells left out)."""
    out: dict[str, Any] = {}
    for attn in attns:
        ok = [r for r in records if r["attn"] == attn and r["status"] == "ok"]
        per_len = {}
        for n in sorted(lengths):
            cells = [r for r in ok if r["length"] == n]
            if cells:
                per_len[str(n)] = {
                    "exact": sum(r["exact"] for r in cells) / len(cells),
                    "rank1": sum(r["rank1"] for r in cells) / len(cells),
                    "logprob": sum(r["logprob"] for r in cells) / len(cells),
                }
        out[attn] = {
            "exact": sum(r["exact"] for r in ok) / len(ok) if ok else None,
            "rank1": sum(r["rank1"] for r in ok) / len(ok) if ok else None,
            "cells": len(ok),
            "oom_cells": sum(1 for r in records if r["attn"] == attn and r["status"] == "oom"),
            "per_length": per_len,
        }
    return out
