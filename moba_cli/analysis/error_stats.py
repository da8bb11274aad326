"""Streaming error statistics of one output against a reference, over query rows and per head."""

from __future__ import annotations

import math

import torch


class ErrorStats:
    """Streaming error of ``out`` against ``ref`` over query rows, overall and per query head.

    Feed ``[rows, Hq, D]`` pieces; reads max abs error, relative L2 ``||out - ref|| / ||ref||`` and the
    worst single-row relative L2 (one row = one query and head). Rows where either side holds NaN or inf
    are counted in ``nonfinite`` and kept out of the other figures, which stay finite: a poisoned row must
    show up as such, not vanish (``max(0.0, nan)`` is 0.0) or turn every figure into NaN.
    """

    def __init__(self, heads: int) -> None:
        self.max_abs = torch.zeros(heads, dtype=torch.float64)
        self.diff_sq = torch.zeros(heads, dtype=torch.float64)
        self.ref_sq = torch.zeros(heads, dtype=torch.float64)
        self.worst_row = 0.0
        self.rows = 0
        self.nonfinite = 0  # (row, head) pairs with NaN or inf in out or ref

    def update(self, out: torch.Tensor, ref: torch.Tensor) -> None:
        o, r = out.float(), ref.float()
        ok = torch.isfinite(o).all(-1) & torch.isfinite(r).all(-1)  # [rows, Hq]
        self.nonfinite += int((~ok).sum())
        o, r = torch.where(ok[..., None], o, 0.0), torch.where(ok[..., None], r, 0.0)
        d = o - r
        d_sq, r_sq = d.square().sum(-1), r.square().sum(-1)  # [rows, Hq]
        self.max_abs = torch.maximum(self.max_abs, d.abs().amax(dim=(0, 2)).double().cpu())
        self.diff_sq += d_sq.sum(0).double().cpu()
        self.ref_sq += r_sq.sum(0).double().cpu()
        row = (d_sq / r_sq.clamp_min(torch.finfo(torch.float32).tiny)).sqrt()
        self.worst_row = max(self.worst_row, float(row.max()) if row.numel() else 0.0)
        self.rows += out.shape[0]

    def rel_l2(self) -> float:
        return math.sqrt(float(self.diff_sq.sum()) / max(float(self.ref_sq.sum()), 1e-300))

    def head_rel_l2(self) -> list[float]:
        return (self.diff_sq / self.ref_sq.clamp_min(1e-300)).sqrt().tolist()

    def summary(self) -> dict[str, float | int]:
        return {"max_abs": float(self.max_abs.max()), "rel_l2": self.rel_l2(), "worst_row_rel_l2": self.worst_row,
                "nonfinite_rows": self.nonfinite}


def output_error(out: torch.Tensor, ref: torch.Tensor, rows_per_step: int = 16384) -> ErrorStats:
    """Error of ``out`` against ``ref`` (``[T, Hq, D]``), a slice of rows at a time (no full float32 copy)."""
    stats = ErrorStats(out.shape[1])
    for r0 in range(0, out.shape[0], rows_per_step):
        stats.update(out[r0 : r0 + rows_per_step], ref[r0 : r0 + rows_per_step])
    return stats


def percentile(x: torch.Tensor, p: float) -> float | None:
    """``p``-th percentile (linear interpolation) of all values of ``x``; works past torch.quantile's size cap.

    None when ``x`` is empty (strict JSON has no NaN)."""
    flat = x.flatten().double().sort().values
    if flat.numel() == 0:
        return None
    pos = (flat.numel() - 1) * p / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, flat.numel() - 1)
    return float(flat[lo] + (flat[hi] - flat[lo]) * (pos - lo))
