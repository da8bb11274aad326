"""How much of causal attention a MoBA layer skips: the analytic pair count behind ``moba convert``'s table.

Pure arithmetic (no torch). The per-query rule is the gate's: a query in block ``i`` attends its own block
up to itself plus ``min(topk - 1, i)`` complete past blocks.
"""

from __future__ import annotations

from typing import Any

from moba_cli.integrations.settings import MobaSettings

SPARSITY_LENGTHS = (32 * 1024, 128 * 1024, 1024 * 1024)


def _sum_min(m: int, f: int) -> int:
    """``sum(min(m, i) for i in range(f))`` in closed form."""
    if f <= m:
        return f * (f - 1) // 2
    return m * (m - 1) // 2 + (f - m) * m


def attended_pairs(seq_len: int, chunk_size: int, topk: int) -> int:
    """(query, key) pairs one MoBA layer computes on one causal sequence of ``seq_len`` tokens.

    A query in block ``i`` attends its own block up to itself plus ``min(topk - 1, i)`` complete past blocks.
    """
    c, m = chunk_size, topk - 1
    full_blocks, rest = divmod(seq_len, c)
    pairs = full_blocks * c * (c + 1) // 2 + c * c * _sum_min(m, full_blocks)
    if rest:
        pairs += rest * (rest + 1) // 2 + rest * c * min(m, full_blocks)
    return pairs


def expected_sparsity(seq_len: int, chunk_size: int, topk: int) -> float:
    """Fraction of the causal (query, key) pairs a MoBA layer skips at ``seq_len`` tokens."""
    causal = seq_len * (seq_len + 1) // 2
    return 1.0 - attended_pairs(seq_len, chunk_size, topk) / causal


def sparsity_records(settings: MobaSettings, num_layers: int) -> list[dict[str, Any]]:
    """Expected sparsity at 32K, 128K and 1M tokens, per MoBA layer and over all layers."""
    n_moba = num_layers - len(settings.full_layers)
    rows = []
    for n in SPARSITY_LENGTHS:
        s = expected_sparsity(n, settings.chunk_size, settings.topk)
        rows.append({
            "seq_len": n,
            "blocks": -(-n // settings.chunk_size),
            "sparsity_moba_layer": s,
            "sparsity_model": s * n_moba / num_layers,
        })
    return rows
