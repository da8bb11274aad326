"""The equivalence check: MoBA with top-k covering every block must equal dense causal attention within
the dtype's rounding (the main correctness oracle), on the sparse kernels, not the dense shortcut."""

from __future__ import annotations

import math
from typing import Any

import torch

from moba_cli.analysis.error_stats import ErrorStats
from moba_cli.analysis.inputs import CompareSetup
from moba_cli.analysis.recall import Progress, analyse_selection
from moba_cli.errors import MobaError

# Equivalence tolerance: relative L2 error of MoBA with top-k covering every block against a float32
# dense reference. Then MoBA computes exactly full causal attention and only rounding separates the two.
# Rounding the output to the run dtype alone costs about u/3 in relative L2 (unit roundoff u: bf16 2^-8,
# fp16 2^-11, fp32 2^-24); a kernel that also rounds the softmax weights before P @ V and merges
# per-block partial results roughly triples that. The floors leave 5-10x headroom above it
# (bf16 2e-2 ~ 5u, fp16 5e-3 ~ 10u, fp32 1e-5 for accumulation order over long rows), while a real
# mistake (a block missed or counted twice, a wrong causal edge, a bad merge) shifts the affected rows
# by roughly that block's share of the softmax mass, percents to O(1).
EQUIV_REL_L2_FLOOR = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# When the dtype's own SDPA is less accurate than the floor on these inputs (e.g. TF32 matmuls), MoBA
# gets twice SDPA's error: it should not be held to a stricter standard than the dense kernel it replaces.
EQUIV_SDPA_FACTOR = 2.0
# A single row's error averages only D elements, so it scatters more than the global figure; 8x the
# global bound absorbs that scatter yet still catches a bug confined to a few rows, which the global
# relative L2 would dilute among millions of correct ones.
EQUIV_ROW_FACTOR = 8.0

# The all-blocks run of the equivalence check gives the sparse kernels O(T * Hq * blocks) work-list
# entries; past this many it runs on a prefix of every sequence instead. A causal prefix is exact (its
# outputs do not depend on later tokens), so the prefix tests the same arithmetic at bounded cost.
EQUIV_MAX_ENTRIES = 2**28


def equivalence_tolerance(dtype: torch.dtype, sdpa_rel_l2: float) -> dict[str, float]:
    """Bounds for the equivalence check; see the comment on :data:`EQUIV_REL_L2_FLOOR` for the reasoning."""
    rel = max(EQUIV_REL_L2_FLOOR[dtype], EQUIV_SDPA_FACTOR * sdpa_rel_l2)
    return {"rel_l2": rel, "worst_row_rel_l2": EQUIV_ROW_FACTOR * rel}


def pack(x: torch.Tensor) -> torch.Tensor:
    """``[B, S, ...]`` -> ``[B * S, ...]`` (the packed layout; a view where possible)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def run_moba(q, k, v, chunk: int, topk: int, backend: str, sparse_only: bool = False) -> torch.Tensor:
    """``moba_attention`` with one clear error when the backend is missing from this build.

    ``sparse_only``: the triton backend hands a top-k that covers every block to dense SDPA (same result,
    faster); the equivalence check is there to test the *sparse* kernels, so it turns that shortcut off.
    """
    from moba_cli.ops.moba import KernelOptions, moba_attention

    options = KernelOptions.from_env().replace(dense_when_full=False) if sparse_only and backend == "triton" else None
    try:
        return moba_attention(q, k, v, chunk_size=chunk, topk=topk, backend=backend, options=options)
    except ImportError as e:
        raise MobaError(f"the {backend} backend is not available in this build ({e}); try --backend naive") from None


def equivalence_length(batch: int, seq: int, heads: int, chunk: int) -> int:
    """Tokens per sequence the equivalence check runs on: all of them unless the all-blocks run would
    exceed :data:`EQUIV_MAX_ENTRIES` (query, head, block) entries; then the longest prefix that fits, in
    whole blocks (at least one)."""
    blocks = (seq + chunk - 1) // chunk
    if batch * seq * heads * blocks <= EQUIV_MAX_ENTRIES:
        return seq
    fit = int(math.isqrt(EQUIV_MAX_ENTRIES * chunk // (batch * heads)))
    return min(seq, max(chunk, fit // chunk * chunk))  # a chunk longer than the sequence is the whole of it


def check_equivalence(setup: CompareSetup, q, k, v, o_full: torch.Tensor, say: Progress) -> dict[str, Any]:
    """MoBA with top-k covering every block against a float32 dense reference, and SDPA's own error on
    the same rows for the tolerance. q/k/v/o_full ``[B, S, H, D]``."""
    b, s, hq, _ = q.shape
    s_eq = equivalence_length(b, s, hq, setup.chunk)
    blocks = (s_eq + setup.chunk - 1) // setup.chunk
    say(f"MoBA with every block (top-k {blocks}): the equivalence check", 0.0)
    qe, ke, ve = (x[:, :s_eq] for x in (q, k, v))
    o_all = pack(run_moba(qe, ke, ve, setup.chunk, blocks, setup.backend, sparse_only=True))
    eq_stats, sdpa_stats = ErrorStats(hq), ErrorStats(hq)

    def score_rows(rows: torch.Tensor, ref: torch.Tensor) -> None:
        eq_stats.update(o_all[rows], ref)
        sdpa_stats.update(o_full[rows // s_eq, rows % s_eq], ref)

    cu = torch.arange(0, (b + 1) * s_eq, s_eq, dtype=torch.int32, device=q.device)
    analyse_selection(pack(qe), pack(ke), pack(ve), cu, setup.chunk, blocks, seed=setup.seed,
                      row_hook=score_rows, progress=lambda stage, frac: say("equivalence check", frac))
    tol = equivalence_tolerance(setup.dtype, sdpa_stats.rel_l2())
    eq = eq_stats.summary()
    result = {
        "passed": bool(eq_stats.rows > 0 and eq["nonfinite_rows"] == 0 and eq["rel_l2"] <= tol["rel_l2"]
                       and eq["worst_row_rel_l2"] <= tol["worst_row_rel_l2"]),
        "nonfinite_rows": eq["nonfinite_rows"],
        "max_abs": eq["max_abs"],
        "rel_l2": eq["rel_l2"],
        "worst_row_rel_l2": eq["worst_row_rel_l2"],
        "tolerance": tol,
        "topk": blocks,
        "tokens_per_sequence": s_eq,
        "reference": "dense causal attention in float32 (tiled, same inputs)",
        "path": "sparse kernels" if setup.backend == "triton" else setup.backend,
        "sdpa_rel_l2": sdpa_stats.rel_l2(),
        "rows_checked": eq_stats.rows,
    }
    if eq["nonfinite_rows"]:
        result["note"] = (f"{eq['nonfinite_rows']} (row, head) pairs of MoBA's or the reference's output are NaN "
                          "or infinite; the error figures cover the finite ones")
    return result
