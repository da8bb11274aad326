"""MoBA against full attention on the same inputs (``moba compare``): output error, softmax-mass recall,
sparsity, equivalence. Modules: :mod:`.inputs` (options, q/k/v), :mod:`.error_stats`, :mod:`.recall`
(selection, recall, sparsity), :mod:`.equivalence`, and this one, which runs them in order.

Everything works on the packed layout (q ``[T, Hq, D]``, k/v ``[T, Hkv, D]``, ``cu_seqlens``) and in
query tiles, so memory stays O(tile * S) and O(T * Hq * slots), never O(S^2):

* **output error**: ``o_moba`` against dense causal attention (torch SDPA) in the run's dtype.
* **recall**: for each query and head, the share of its *full* causal softmax mass that lies in the blocks
  MoBA chose: ``sum over chosen blocks b, keys j in b of exp(s_j - lse_full)``. ``1.0`` means MoBA lost
  nothing for that query. Also the *oracle* recall: the best any choice of the same number of blocks
  (own block forced) could reach, so the gate's quality can be read apart from the budget.
* **sparsity**: share of the causal (query, key) pairs MoBA skips, counted from the actual selection.
* **equivalence**: the same inputs with top-k covering every block must equal dense attention within
  the dtype's rounding (:mod:`.equivalence`).

The selection is recomputed (:mod:`.recall`) with the reference rule of :func:`moba_cli.ops.moba.naive.select_blocks`
(q . mean(block keys) in float32, stable descending sort: the earlier block wins ties), tile by tile so
very long sequences fit; the tests check both give identical block ids. With the triton backend the
kernel's own gate is used instead (what actually ran), and its agreement with the rule is reported.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from moba_cli.analysis.equivalence import check_equivalence, pack, run_moba
from moba_cli.analysis.error_stats import output_error, percentile
from moba_cli.analysis.inputs import CompareSetup, check_finite, random_qkv
from moba_cli.analysis.recall import Progress, analyse_selection
from moba_cli.ops.moba.layout import make_layout
from moba_cli.utils.metrics import strict_floats


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
    check_finite({"q": q, "k": k, "v": v}, f"the inputs in {str(setup.dtype).removeprefix('torch.')}")
    from moba_cli.ops.moba import full_attention

    b, s, hq, d = q.shape
    qp, kp, vp = pack(q), pack(k), pack(v)
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)

    say("full attention (torch SDPA)", 0.0)
    o_full = full_attention(q, k, v, backend="auto")
    say(f"MoBA ({setup.backend})", 0.0)
    o_moba = run_moba(q, k, v, setup.chunk, setup.topk, setup.backend)
    err = output_error(pack(o_moba), pack(o_full))
    del o_moba

    kernel_sel = _kernel_selection(qp, kp, cu, setup.chunk, setup.topk, setup.backend)
    ana = analyse_selection(qp, kp, vp, cu, setup.chunk, setup.topk, seed=setup.seed, block_idx=kernel_sel,
                            progress=lambda stage, frac: say("recall and sparsity", frac))
    del kernel_sel
    equivalence = check_equivalence(setup, q, k, v, o_full, say)

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
        "recall_mean": float(ana.recall.mean()) if ana.recall.numel() else None,
        "recall_p5": percentile(ana.recall, 5),
        "recall_oracle_mean": float(ana.recall_oracle.mean()) if ana.recall_oracle.numel() else None,
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
    if err.nonfinite:
        summary["output_nonfinite_rows"] = err.nonfinite
    # Strict JSON: any figure that came out NaN/inf (e.g. outputs poisoned by overflow) is null, with a note.
    records, bad_records = strict_floats(records, "records")
    summary, bad_summary = strict_floats(summary, "summary")
    config = setup.config()
    config["notes"] = list(setup.notes)
    if bad_records or bad_summary:
        config["notes"].append("not finite, written as null: " + ", ".join(bad_summary + bad_records))
    return config, records, summary
