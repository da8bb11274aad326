"""How much of causal attention a MoBA layer skips: ``moba convert``'s table, from the op's pair count
(:mod:`moba_cli.ops.moba.pairs`). The per-query rule is the gate's: a query in block ``i`` attends its own block
up to itself plus ``min(topk - 1, i)`` complete past blocks.
"""

from __future__ import annotations

from typing import Any

from moba_cli.integrations.settings import MobaSettings
from moba_cli.ops.moba.pairs import attended_pairs
from moba_cli.ops.moba.pairs import sparsity as expected_sparsity

__all__ = ["SPARSITY_LENGTHS", "attended_pairs", "expected_sparsity", "sparsity_records"]

SPARSITY_LENGTHS = (32 * 1024, 128 * 1024, 1024 * 1024)


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
