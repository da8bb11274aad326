"""Which blocks MoBA chooses and what that costs: sparsity over every query, softmax-mass recall (and the
oracle's) over every row or a seeded sample of rows, in tiles so memory stays O(tile * S).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moba_cli.errors import MobaError
from moba_cli.ops.moba.layout import BlockLayout, make_layout, num_slots
from moba_cli.ops.moba.naive import block_means, score_blocks, top_blocks

# Above this many query rows the recall and the equivalence check use a seeded random sample of rows
# (their dense float32 reference costs O(rows * S)); sparsity and the output error always use every row.
RECALL_FULL_ROWS = 65536
RECALL_SAMPLE_ROWS = 8192

# Elements per float32 temporary in one tile (64 MiB on CPU, 512 MiB on GPU).
_TILE_ELEMS = {"cpu": 2**24, "cuda": 2**27}

Progress = Callable[[str, float], None]


def select_tile(
    q_tile: torch.Tensor, means: torch.Tensor, pos: torch.Tensor, chunk: int, slots: int, first: int
) -> torch.Tensor:
    """Blocks chosen by some query rows of one sequence, by the reference gate rule
    (:func:`~moba_cli.ops.moba.naive.score_blocks`, :func:`~moba_cli.ops.moba.naive.top_blocks`).

    q_tile ``[R, Hq, D]`` (the rows at local positions ``pos [R]``), means ``[nb, Hkv, D]`` float32 block
    means of the sequence, ``first`` its first global block id. Returns global ids ``[R, Hq, slots]``
    int64: slot 0 the own block, then past blocks by decreasing score, ``-1`` where there are fewer.
    """
    r, hq, _ = q_tile.shape
    nb = means.shape[0]
    own = pos // chunk
    out = torch.full((r, hq, slots), -1, dtype=torch.int64, device=q_tile.device)
    out[:, :, 0] = (own + first)[:, None]
    n = min(slots - 1, nb)
    if n <= 0:
        return out
    past = torch.arange(nb, device=q_tile.device)[None, :] < own[:, None]
    local = top_blocks(score_blocks(q_tile, means).masked_fill(~past[:, None, :], float("-inf")), n)
    out[:, :, 1 : 1 + n] = torch.where(local >= 0, local + first, local)
    return out


def attended_keys(sel: torch.Tensor, gpos: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Keys each (query, head) attends under selection ``sel [R, Hq, slots]``: ``[R, Hq]`` int64.

    A chosen block contributes its keys at or before the query (all of a past block, the causal part of
    the own block). ``gpos [R]`` are the queries' packed positions.
    """
    ids = sel.clamp_min(0)
    start = layout.block_start.long()[ids]
    end = torch.minimum(layout.block_end.long()[ids], gpos[:, None, None] + 1)
    return ((end - start).clamp_min(0) * (sel >= 0)).sum(-1)


def reference_rows(
    q: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, pos: torch.Tensor, chunk: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal float32 attention for some rows of one sequence, plus each row's softmax mass per block.

    q ``[R, Hq, D]`` (rows at sorted local positions ``pos [R]``), kf/vf ``[S, Hkv, D]`` float32 of the
    sequence. Returns ``(out [R, Hq, D], block_mass [R, Hq, nb])`` where ``block_mass[..., b]`` is
    ``sum_{j in block b, j <= pos} exp(s_j - lse_full)``; it sums to 1 over b.
    """
    r, hq, d = q.shape
    hkv = kf.shape[1]
    keys = int(pos[-1]) + 1
    s = torch.einsum("shgd,khd->shgk", q.float().view(r, hkv, hq // hkv, d), kf[:keys]).reshape(r, hq, keys)
    s.mul_(scale)
    future = torch.arange(keys, device=q.device)[None, :] > pos[:, None]
    s.masked_fill_(future[:, None, :], float("-inf"))
    s.sub_(torch.logsumexp(s, dim=-1, keepdim=True)).exp_()  # s is now the softmax p
    out = torch.einsum("shgk,khd->shgd", s.view(r, hkv, hq // hkv, keys), vf[:keys]).reshape(r, hq, d)
    # Complete blocks summed in one view, the short last block on its own: padding to whole blocks would
    # allocate a chunk's worth of zeros per row when the chunk is much longer than the sequence.
    full = keys // chunk
    mass = [s[..., : full * chunk].view(r, hq, full, chunk).sum(-1)] if full else []
    if keys > full * chunk:
        mass.append(s[..., full * chunk :].sum(-1, keepdim=True))
    return out, torch.cat(mass, dim=-1)


@dataclass
class SelectionAnalysis:
    """What :func:`analyse_selection` measures."""

    sparsity: float
    attended_pairs: int
    causal_pairs: int
    recall: torch.Tensor  # [rows, Hq] float32 on CPU
    recall_oracle: torch.Tensor  # [rows, Hq]
    rows: torch.Tensor  # [rows] packed positions the recall covers
    sampled: bool
    selection_agreement: float | None = None  # share of (query, head) where a given selection = the rule's


def _sample_rows(total: int, max_rows: int | None, count: int, seed: int) -> torch.Tensor | None:
    """``count`` distinct rows of ``total``, uniform and sorted, when ``total > max_rows``; else None (all)."""
    if max_rows is None or total <= max_rows:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=g)[: min(count, total)].sort().values


def analyse_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    chunk: int,
    topk: int,
    *,
    softmax_scale: float | None = None,
    max_rows: int | None = RECALL_FULL_ROWS,
    sample_rows: int = RECALL_SAMPLE_ROWS,
    seed: int = 0,
    block_idx: torch.Tensor | None = None,
    row_hook: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    progress: Progress | None = None,
) -> SelectionAnalysis:
    """Sparsity over every query; recall over every row, or over sampled rows at long lengths.

    q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` packed with ``cu_seqlens``. When ``T > max_rows`` the recall uses
    ``sample_rows`` rows drawn with ``seed``. ``block_idx [T, Hq, slots]`` (e.g. the kernel's own gate) is
    used instead of the reference rule when given; ``selection_agreement`` then says on which share of
    (query, head) pairs the two chose the same set of blocks. ``row_hook(rows, ref_out)`` receives each
    tile's packed row positions and float32 reference output (to score other outputs on the same rows
    without keeping the reference). ``progress(stage, fraction)`` is called as work advances.
    """
    t_total, hq, d = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    layout = make_layout(cu_seqlens, chunk)
    slots = num_slots(topk, layout.max_blocks)
    means_all = block_means(k, layout)
    sample = _sample_rows(t_total, max_rows, sample_rows, seed)
    sampled = sample is not None
    if sample is not None:
        sample = sample.to(q.device)
    budget = _TILE_ELEMS["cuda" if q.is_cuda else "cpu"]
    attended = 0
    causal = 0
    agree = 0
    recalls, oracles, row_list = [], [], []
    cu = cu_seqlens.tolist()
    done = 0
    for i in range(len(cu) - 1):
        s0, s1 = cu[i], cu[i + 1]
        n = s1 - s0
        if n == 0:
            continue
        first = int(layout.token_first_block[s0])
        nb = (n + chunk - 1) // chunk
        means = means_all[first : first + nb]
        if sample is not None:
            rows = sample[(sample >= s0) & (sample < s1)] - s0
        else:
            rows = torch.arange(n, device=q.device)
        kf, vf = k[s0:s1].float(), v[s0:s1].float()
        sel_tile = max(1, min(n, budget // (hq * max(nb, slots))))
        ref_tile = max(1, budget // (hq * n))
        for r0 in range(0, n, sel_tile):
            r1 = min(n, r0 + sel_tile)
            pos = torch.arange(r0, r1, device=q.device)
            sel = select_tile(q[s0 + r0 : s0 + r1], means, pos, chunk, slots, first)
            if block_idx is not None:
                given = block_idx[s0 + r0 : s0 + r1].long()
                if given.shape != sel.shape:
                    raise MobaError(f"block_idx has shape {tuple(block_idx.shape)}, expected [T, Hq, {slots}]")
                # Same blocks in any slot order (the order of equal scores is not part of the contract).
                agree += int((given.sort(-1).values == sel.sort(-1).values).all(-1).sum())
                sel = given
            attended += int(attended_keys(sel, pos + s0, layout).sum())
            causal += hq * ((r1 * (r1 + 1) - r0 * (r0 + 1)) // 2)
            # Recall on this tile's rows that are in the recall set.
            mine = rows[(rows >= r0) & (rows < r1)]
            for a in range(0, len(mine), ref_tile):
                rp = mine[a : a + ref_tile]
                out, mass = reference_rows(q[s0 + rp], kf, vf, rp, chunk, scale)
                local = sel[rp - r0] - first  # [R, Hq, slots] local block ids, <0 when unused
                hit = torch.gather(mass, 2, local.clamp_min(0)) * (local >= 0)
                recalls.append(hit.sum(-1).cpu())
                oracles.append(_oracle_recall(mass, rp // chunk, slots).cpu())
                row_list.append((rp + s0).cpu())
                if row_hook is not None:
                    row_hook(rp + s0, out)
            done += r1 - r0
            if progress is not None:
                progress("recall and sparsity", done / t_total)
    empty = torch.zeros(0, hq)
    return SelectionAnalysis(
        sparsity=1.0 - attended / causal if causal else 0.0,
        attended_pairs=attended,
        causal_pairs=causal,
        recall=torch.cat(recalls) if recalls else empty,
        recall_oracle=torch.cat(oracles) if oracles else empty,
        rows=torch.cat(row_list) if row_list else torch.zeros(0, dtype=torch.long),
        sampled=sampled,
        selection_agreement=agree / (t_total * hq) if block_idx is not None and t_total else None,
    )


def _oracle_recall(mass: torch.Tensor, own: torch.Tensor, slots: int) -> torch.Tensor:
    """Best recall any selection of the same size reaches: own block plus the ``slots - 1`` heaviest past
    blocks. mass ``[R, Hq, nb]``, own ``[R]`` local own block -> ``[R, Hq]``."""
    nb = mass.shape[-1]
    own_mass = torch.gather(mass, 2, own[:, None, None].expand(-1, mass.shape[1], 1)).squeeze(-1)
    n = min(slots - 1, nb)
    if n <= 0:
        return own_mass
    past = torch.arange(nb, device=mass.device)[None, :] < own[:, None]
    top = mass.masked_fill(~past[:, None, :], 0.0).topk(n, dim=-1).values
    return own_mass + top.sum(-1)
