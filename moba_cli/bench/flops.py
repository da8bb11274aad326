"""Work counted for effective TFLOP/s: attended (query, key) pairs, as flash-attention's benchmarks count.

One attended pair costs ``4 * D`` FLOPs in the forward pass (``q.k`` and ``p.v``, a multiply and an add
each). The backward pass counts 2.5x the forward, so ``fwd+bwd`` is 3.5x. The MoBA gate (``q . mean(k)``
over blocks) and the block means are not counted: the figure is attention work only, for every provider.

For MoBA the pairs follow from the selection, and they do not depend on *which* blocks are chosen (every
chosen past block is complete): the per-sequence count is :func:`moba_cli.ops.moba.pairs.attended_pairs`,
the one ``moba convert`` uses too. (The tests check it against the reference selection.)
"""

from __future__ import annotations

from moba_cli.ops.moba.pairs import attended_pairs, causal_pairs

FWD_FLOPS_PER_PAIR_PER_DIM = 4
PASS_FACTOR = {"fwd": 1.0, "fwd+bwd": 3.5, "decode": 1.0}


def decode_pairs(length: int, chunk: int | None = None, topk: int | None = None) -> int:
    """Keys one new query attends in a cache of ``length`` tokens (itself included, at ``length - 1``).

    Dense when ``chunk`` is None; else MoBA: its own block up to itself plus ``topk - 1`` complete blocks.
    """
    if chunk is None:
        return length
    own = (length - 1) // chunk
    return chunk * min(topk - 1, own) + (length - 1) % chunk + 1


def call_pairs(kind: str, pass_: str, batch: int, seq: int, heads: int, chunk: int, topk: int) -> int:
    """All pairs of one call: ``kind`` is ``"moba"`` or ``"dense"``; summed over batch and query heads."""
    if pass_ == "decode":
        per_head = decode_pairs(seq, chunk, topk) if kind == "moba" else decode_pairs(seq)
    else:
        per_head = attended_pairs(seq, chunk, topk) if kind == "moba" else causal_pairs(seq)
    return batch * heads * per_head


def attention_flops(pairs: int, head_dim: int, pass_: str) -> float:
    """FLOPs of one call: ``4 * pairs * D`` forward, times 3.5 for ``fwd+bwd``."""
    return FWD_FLOPS_PER_PAIR_PER_DIM * pairs * head_dim * PASS_FACTOR[pass_]


def tflops(flops: float, ms: float | None) -> float | None:
    if ms is None or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12
