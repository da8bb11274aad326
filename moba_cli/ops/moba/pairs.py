"""How many (query, key) pairs MoBA attends: the one count the bench (TFLOP/s), ``moba convert``
(expected sparsity) and ``moba compare`` share.

The count does not depend on *which* blocks the gate picks: every chosen past block is complete
(``chunk_size`` keys), so a query in local block ``j`` attends ``chunk_size * min(topk - 1, j)`` past keys
plus its own block up to itself.
"""

from __future__ import annotations


def causal_pairs(seq_len: int) -> int:
    """Pairs of dense causal attention over one sequence: ``S (S + 1) / 2``."""
    return seq_len * (seq_len + 1) // 2


def _sum_min(m: int, f: int) -> int:
    """``sum(min(m, i) for i in range(f))`` in closed form."""
    if f <= m:
        return f * (f - 1) // 2
    return m * (m - 1) // 2 + (f - m) * m


def attended_pairs(seq_len: int, chunk_size: int, topk: int) -> int:
    """Pairs one MoBA head attends on one causal sequence of ``seq_len`` tokens (closed form)."""
    c, m = chunk_size, topk - 1
    full_blocks, rest = divmod(seq_len, c)
    pairs = full_blocks * c * (c + 1) // 2 + c * c * _sum_min(m, full_blocks)
    if rest:
        pairs += rest * (rest + 1) // 2 + rest * c * min(m, full_blocks)
    return pairs


def sparsity(seq_len: int, chunk_size: int, topk: int) -> float:
    """Fraction of the causal pairs MoBA skips on one sequence of ``seq_len`` tokens (0 for an empty one)."""
    causal = causal_pairs(seq_len)
    return 1.0 - attended_pairs(seq_len, chunk_size, topk) / causal if causal else 0.0
