"""MoBA against full attention on the same inputs: output error, softmax-mass recall, sparsity, equivalence.

Everything works on the packed layout (q ``[T, Hq, D]``, k/v ``[T, Hkv, D]``, ``cu_seqlens``) and in
query tiles, so memory stays O(tile * S) and O(T * Hq * slots), never O(S^2):

* **output error**: ``o_moba`` against dense causal attention (torch SDPA) in the run's dtype.
* **recall**: for each query and head, the share of its *full* causal softmax mass that lies in the blocks
  MoBA chose: ``sum over chosen blocks b, keys j in b of exp(s_j - lse_full)``. ``1.0`` means MoBA lost
  nothing for that query. Also the *oracle* recall: the best any choice of the same number of blocks
  (own block forced) could reach, so the gate's quality can be read apart from the budget.
* **sparsity**: share of the causal (query, key) pairs MoBA skips, counted from the actual selection.
* **equivalence**: the same inputs with top-k covering every block must equal dense attention within
  the dtype's rounding (see :func:`equivalence_tolerance`).

The selection is recomputed here with the reference rule of :func:`moba_cli.ops.moba.naive.select_blocks`
(q . mean(block keys) in float32, stable descending sort: the earlier block wins ties), tile by tile so
very long sequences fit; the tests check both give identical block ids. With the triton backend the
kernel's own gate is used instead (what actually ran), and its agreement with the rule is reported.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moba_cli.errors import MobaError
from moba_cli.ops.moba.layout import BlockLayout, make_layout, num_slots
from moba_cli.ops.moba.naive import block_means
from moba_cli.ops.moba.validate import SUPPORTED_DTYPES, TRITON_HEAD_DIMS, resolve_backend

# Defaults of `moba compare` with no options. Both keep chunk/topk at 16 blocks with 3 chosen, the
# ratio of the paper's 8K runs (block 512, top-k 3), so a first run shows real sparsity (~80%).
# CPU: small enough for the float32 reference to finish in seconds on 2 cores.
# CUDA: a realistic long-context shape (32K tokens, 8 heads of 128) that runs in well under a minute.
DEFAULTS: dict[str, dict[str, int]] = {
    "cpu": {"seq": 2048, "batch": 1, "heads": 4, "head_dim": 64, "chunk": 128, "topk": 3},
    "cuda": {"seq": 32768, "batch": 1, "heads": 8, "head_dim": 128, "chunk": 2048, "topk": 3},
}

# Above this many query rows the recall and the equivalence check use a seeded random sample of rows
# (their dense float32 reference costs O(rows * S)); sparsity and the output error always use every row.
RECALL_FULL_ROWS = 65536
RECALL_SAMPLE_ROWS = 8192

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

# Elements per float32 temporary in one tile (64 MiB on CPU, 512 MiB on GPU).
_TILE_ELEMS = {"cpu": 2**24, "cuda": 2**27}

Progress = Callable[[str, float], None]


@dataclass
class CompareSetup:
    """Resolved options of one comparison (all sizes known, backend picked)."""

    seq: int
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    chunk: int
    topk: int
    dtype: torch.dtype
    device: torch.device
    backend: str
    seed: int = 0
    qkv: Path | None = None
    notes: list[str] = field(default_factory=list)

    def config(self) -> dict[str, Any]:
        d = asdict(self)
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        d["device"] = str(self.device)
        d["qkv"] = str(self.qkv) if self.qkv is not None else None
        d["inputs"] = "file" if self.qkv is not None else "random (randn)"
        d["softmax_scale"] = 1.0 / math.sqrt(self.head_dim)
        d.pop("notes")
        return d


def default_dtype(device: torch.device) -> torch.dtype:
    """``auto`` dtype: bfloat16 on CUDA (what long-context models run in), float32 on CPU (the naive
    backend computes in float32 anyway and CPU half-precision matmuls are slow)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def pick_backend(backend: str, device: torch.device, head_dim: int) -> tuple[str, str | None]:
    """Resolve ``auto|naive|triton`` for this device and head dim; returns ``(backend, note)``.

    ``auto`` is triton on CUDA when the kernels take the head dim, else naive. Unlike the library's
    ``auto`` it ignores TRITON_INTERPRET: the interpreter is for tests, far too slow for a comparison.
    """
    backend = backend.lower()
    if backend == "auto":
        if device.type != "cuda":
            return "naive", None
        if head_dim not in TRITON_HEAD_DIMS:
            return "naive", f"head dim {head_dim} has no triton kernel; using the float32 naive backend"
        return "triton", None
    # The library's own checks (unknown name, triton on CPU, head dim) on an empty probe tensor.
    probe = torch.empty(0, 0, 1, head_dim, device=device)
    return resolve_backend(backend, probe), None


def check_sizes(seq: int, batch: int, heads: int, kv_heads: int, head_dim: int, chunk: int, topk: int) -> None:
    for name, value in (("--seq", seq), ("--batch", batch), ("--heads", heads), ("--kv-heads", kv_heads),
                        ("--head-dim", head_dim), ("--chunk", chunk), ("--topk", topk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MobaError(f"{name} must be a positive integer, got {value!r}")
    if heads % kv_heads != 0:
        raise MobaError(f"--kv-heads ({kv_heads}) must divide --heads ({heads}) (MHA, GQA or MQA)")


# ----------------------------------------------------------------------------------------------- inputs


def random_qkv(setup: CompareSetup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded ``randn`` q ``[B, S, Hq, D]``, k/v ``[B, S, Hkv, D]`` drawn on the target device.

    The same seed gives the same tensors on the same device type (CPU and CUDA generators differ).
    """
    g = torch.Generator(device=setup.device).manual_seed(setup.seed)
    shape_q = (setup.batch, setup.seq, setup.heads, setup.head_dim)
    shape_kv = (setup.batch, setup.seq, setup.kv_heads, setup.head_dim)
    return tuple(
        torch.randn(s, generator=g, device=setup.device, dtype=torch.float32).to(setup.dtype)
        for s in (shape_q, shape_kv, shape_kv)
    )  # type: ignore[return-value]


def load_qkv(path: Path | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read tensors ``q``, ``k``, ``v`` from a safetensors file, as ``[B, S, H, D]`` (``[S, H, D]`` gains B=1).

    Any problem (missing file, not safetensors, missing names, inconsistent shapes) is one MobaError.
    """
    path = Path(path)
    if path.is_dir():
        raise MobaError(f"--qkv {path} is a folder; give a safetensors file")
    if not path.is_file():
        raise MobaError(f"--qkv file not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            missing = [n for n in ("q", "k", "v") if n not in names]
            if missing:
                have = ", ".join(sorted(names)) or "none"
                raise MobaError(
                    f"{path} has no tensor named {', '.join(missing)}; it needs q, k and v (it has: {have})"
                )
            q, k, v = (f.get_tensor(n) for n in ("q", "k", "v"))
    except MobaError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise MobaError(f"cannot read {path} as a safetensors file: {e}") from None
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() not in (3, 4):
            raise MobaError(f"tensor {name} in {path} must be [B, S, H, D] or [S, H, D], got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise MobaError(f"tensor {name} in {path} must be floating point, got {t.dtype}")
    if not (q.dim() == k.dim() == v.dim()):
        raise MobaError(f"q, k and v in {path} must have the same rank, got {q.dim()}, {k.dim()}, {v.dim()}")
    if q.dim() == 3:
        q, k, v = q[None], k[None], v[None]
    if k.shape != v.shape:
        raise MobaError(f"k and v in {path} must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise MobaError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} in {path} must agree on batch, sequence and head dim"
        )
    if min(q.shape) < 1 or min(k.shape) < 1:
        raise MobaError(f"tensors in {path} must not be empty, got q {tuple(q.shape)}")
    if q.shape[2] % k.shape[2] != 0:
        raise MobaError(f"q has {q.shape[2]} heads, not a multiple of k's {k.shape[2]} heads ({path})")
    return q, k, v


def file_dtype(q: torch.Tensor) -> torch.dtype | None:
    """The file's dtype when the kernels support it, else None (the device default is used)."""
    return q.dtype if q.dtype in SUPPORTED_DTYPES else None


# ------------------------------------------------------------------------------------------ error stats


class ErrorStats:
    """Streaming error of ``out`` against ``ref`` over query rows, overall and per query head.

    Feed ``[rows, Hq, D]`` pieces; reads max abs error, relative L2 ``||out - ref|| / ||ref||`` and the
    worst single-row relative L2 (one row = one query and head).
    """

    def __init__(self, heads: int) -> None:
        self.max_abs = torch.zeros(heads, dtype=torch.float64)
        self.diff_sq = torch.zeros(heads, dtype=torch.float64)
        self.ref_sq = torch.zeros(heads, dtype=torch.float64)
        self.worst_row = 0.0
        self.rows = 0

    def update(self, out: torch.Tensor, ref: torch.Tensor) -> None:
        d = out.float() - ref.float()
        r = ref.float()
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

    def summary(self) -> dict[str, float]:
        return {"max_abs": float(self.max_abs.max()), "rel_l2": self.rel_l2(), "worst_row_rel_l2": self.worst_row}


def output_error(out: torch.Tensor, ref: torch.Tensor, rows_per_step: int = 16384) -> ErrorStats:
    """Error of ``out`` against ``ref`` (``[T, Hq, D]``), a slice of rows at a time (no full float32 copy)."""
    stats = ErrorStats(out.shape[1])
    for r0 in range(0, out.shape[0], rows_per_step):
        stats.update(out[r0 : r0 + rows_per_step], ref[r0 : r0 + rows_per_step])
    return stats


def equivalence_tolerance(dtype: torch.dtype, sdpa_rel_l2: float) -> dict[str, float]:
    """Bounds for the equivalence check; see the comment on :data:`EQUIV_REL_L2_FLOOR` for the reasoning."""
    rel = max(EQUIV_REL_L2_FLOOR[dtype], EQUIV_SDPA_FACTOR * sdpa_rel_l2)
    return {"rel_l2": rel, "worst_row_rel_l2": EQUIV_ROW_FACTOR * rel}


# --------------------------------------------------------------------------------- selection and recall


def select_tile(
    q_tile: torch.Tensor, means: torch.Tensor, pos: torch.Tensor, chunk: int, slots: int, first: int
) -> torch.Tensor:
    """Blocks chosen by some query rows of one sequence, by the rule of ``naive.select_blocks``.

    q_tile ``[R, Hq, D]`` (the rows at local positions ``pos [R]``), means ``[nb, Hkv, D]`` float32 block
    means of the sequence, ``first`` its first global block id. Returns global ids ``[R, Hq, slots]``
    int64: slot 0 the own block, then past blocks by decreasing score, ``-1`` where there are fewer.
    """
    r, hq, d = q_tile.shape
    nb, hkv = means.shape[0], means.shape[1]
    own = pos // chunk
    out = torch.full((r, hq, slots), -1, dtype=torch.int64, device=q_tile.device)
    out[:, :, 0] = (own + first)[:, None]
    n = min(slots - 1, nb)
    if n <= 0:
        return out
    scores = torch.einsum("shgd,nhd->shgn", q_tile.float().view(r, hkv, hq // hkv, d), means).reshape(r, hq, nb)
    past = torch.arange(nb, device=q_tile.device)[None, :] < own[:, None]
    scores = scores.masked_fill(~past[:, None, :], float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True)  # stable: the earlier block wins ties
    top_val, top_idx = order.values[..., :n], order.indices[..., :n]
    out[:, :, 1 : 1 + n] = torch.where(torch.isfinite(top_val), top_idx + first, torch.full_like(top_idx, -1))
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
    nb = (keys + chunk - 1) // chunk
    p = torch.nn.functional.pad(s, (0, nb * chunk - keys))
    return out, p.view(r, hq, nb, chunk).sum(-1)


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


def percentile(x: torch.Tensor, p: float) -> float:
    """``p``-th percentile (linear interpolation) of all values of ``x``; works past torch.quantile's size cap."""
    flat = x.flatten().double().sort().values
    if flat.numel() == 0:
        return float("nan")
    pos = (flat.numel() - 1) * p / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, flat.numel() - 1)
    return float(flat[lo] + (flat[hi] - flat[lo]) * (pos - lo))


# ------------------------------------------------------------------------------------------ the compare


def _pack(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _run_moba(q, k, v, chunk: int, topk: int, backend: str) -> torch.Tensor:
    from moba_cli.ops.moba import KernelOptions, moba_attention

    # The triton backend hands a top-k that covers every block to dense SDPA (same result, faster); the
    # equivalence check is there to test the *sparse* kernels, so that shortcut is off here.
    opts = KernelOptions.from_env().replace(dense_when_full=False) if backend == "triton" else None
    try:
        return moba_attention(q, k, v, chunk_size=chunk, topk=topk, backend=backend, options=opts)
    except ImportError as e:
        raise MobaError(f"the {backend} backend is not available in this build ({e}); try --backend naive") from None


def _kernel_selection(q, k, cu: torch.Tensor, chunk: int, topk: int, backend: str) -> torch.Tensor | None:
    """The triton gate's own choice ``[T, Hq, slots]``, so recall and sparsity describe what ran; None
    for the naive backend (the analysis applies the same rule itself)."""
    if backend != "triton":
        return None
    try:
        from moba_cli.ops.moba.gate import select_blocks
    except ImportError:
        return None
    return select_blocks(q, k, make_layout(cu, chunk), topk)


def equivalence_length(batch: int, seq: int, heads: int, chunk: int) -> int:
    """Tokens per sequence the equivalence check runs on: all of them unless the all-blocks run would
    exceed :data:`EQUIV_MAX_ENTRIES` (query, head, block) entries; then the longest prefix that fits, in
    whole blocks (at least one)."""
    blocks = (seq + chunk - 1) // chunk
    if batch * seq * heads * blocks <= EQUIV_MAX_ENTRIES:
        return seq
    fit = int(math.isqrt(EQUIV_MAX_ENTRIES * chunk // (batch * heads)))
    return max(chunk, min(seq, fit // chunk * chunk))


def _equivalence(setup: CompareSetup, q, k, v, o_full: torch.Tensor, say: Progress) -> dict[str, Any]:
    """MoBA with top-k covering every block against a float32 dense reference, and SDPA's own error on
    the same rows for the tolerance. q/k/v/o_full ``[B, S, H, D]``."""
    b, s, hq, _ = q.shape
    s_eq = equivalence_length(b, s, hq, setup.chunk)
    blocks = (s_eq + setup.chunk - 1) // setup.chunk
    say(f"MoBA with every block (top-k {blocks}): the equivalence check", 0.0)
    qe, ke, ve = (x[:, :s_eq] for x in (q, k, v))
    o_all = _pack(_run_moba(qe, ke, ve, setup.chunk, blocks, setup.backend))
    eq_stats, sdpa_stats = ErrorStats(hq), ErrorStats(hq)

    def score_rows(rows: torch.Tensor, ref: torch.Tensor) -> None:
        eq_stats.update(o_all[rows], ref)
        sdpa_stats.update(o_full[rows // s_eq, rows % s_eq], ref)

    cu = torch.arange(0, (b + 1) * s_eq, s_eq, dtype=torch.int32, device=q.device)
    analyse_selection(_pack(qe), _pack(ke), _pack(ve), cu, setup.chunk, blocks, seed=setup.seed,
                      row_hook=score_rows, progress=lambda stage, frac: say("equivalence check", frac))
    tol = equivalence_tolerance(setup.dtype, sdpa_stats.rel_l2())
    eq = eq_stats.summary()
    return {
        "passed": bool(eq_stats.rows > 0 and eq["rel_l2"] <= tol["rel_l2"]
                       and eq["worst_row_rel_l2"] <= tol["worst_row_rel_l2"]),
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


def run_compare(
    setup: CompareSetup,
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Run the whole comparison. Returns ``(config, records, summary)`` for :func:`make_result`.

    ``qkv`` are ``[B, S, H, D]`` inputs (moved to the setup's device and dtype); random ones when None.
    Records hold one row per query head; the summary the headline numbers and ``equivalence``.
    """
    say = progress or (lambda stage, frac: None)
    t_start = time.perf_counter()
    if qkv is None:
        say("drawing random inputs", 0.0)
        q, k, v = random_qkv(setup)
    else:
        q, k, v = (t.to(device=setup.device, dtype=setup.dtype) for t in qkv)
    from moba_cli.ops.moba import full_attention

    b, s, hq, d = q.shape
    qp, kp, vp = _pack(q), _pack(k), _pack(v)
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)

    say("full attention (torch SDPA)", 0.0)
    o_full = full_attention(q, k, v, backend="auto")
    say(f"MoBA ({setup.backend})", 0.0)
    o_moba = _run_moba(q, k, v, setup.chunk, setup.topk, setup.backend)
    err = output_error(_pack(o_moba), _pack(o_full))
    del o_moba

    kernel_sel = _kernel_selection(qp, kp, cu, setup.chunk, setup.topk, setup.backend)
    ana = analyse_selection(qp, kp, vp, cu, setup.chunk, setup.topk, seed=setup.seed, block_idx=kernel_sel,
                            progress=lambda stage, frac: say("recall and sparsity", frac))
    del kernel_sel
    equivalence = _equivalence(setup, q, k, v, o_full, say)

    head_recall = ana.recall.mean(0).tolist()
    head_oracle = ana.recall_oracle.mean(0).tolist()
    head_err = err.head_rel_l2()
    g = hq // setup.kv_heads
    records = [
        {
            "head": h,
            "kv_head": h // g,
            "recall_mean": head_recall[h],
            "recall_p5": percentile(ana.recall[:, h], 5),
            "recall_oracle_mean": head_oracle[h],
            "max_abs": float(err.max_abs[h]),
            "rel_l2": head_err[h],
        }
        for h in range(hq)
    ]
    summary = {
        "max_abs": float(err.max_abs.max()),
        "rel_l2": err.rel_l2(),
        "recall_mean": float(ana.recall.mean()) if ana.recall.numel() else float("nan"),
        "recall_p5": percentile(ana.recall, 5),
        "recall_oracle_mean": float(ana.recall_oracle.mean()) if ana.recall_oracle.numel() else float("nan"),
        "recall_sampled_rows": int(ana.rows.numel()) if ana.sampled else None,
        "sparsity": ana.sparsity,
        "attended_pairs": ana.attended_pairs,
        "causal_pairs": ana.causal_pairs,
        "blocks_per_sequence": (s + setup.chunk - 1) // setup.chunk,
        "selection": "triton gate" if ana.selection_agreement is not None else "reference rule (naive)",
        "selection_agreement": ana.selection_agreement,
        "equivalence": equivalence,
        "seconds": time.perf_counter() - t_start,
    }
    config = setup.config()
    config["notes"] = list(setup.notes)
    return config, records, summary
