"""`moba compare --model DIR [--text FILE]`: a converted checkpoint with MoBA against full attention.

Called lazily by :mod:`moba_cli.commands.compare` inside its ``user_errors()`` block; the work is in
:mod:`moba_cli.integrations.model_compare`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from moba_cli.commands._common import console, parse_dtype, resolve_device
from moba_cli.errors import MobaError

DEFAULT_SEQ = {"cpu": 1024, "cuda": 8192}


def run_model_compare(
    model: Path | str,
    text: Path | str | None,
    out: Path | str | None,
    device: str = "auto",
    dtype: str = "auto",
    seq: int | None = None,
    *,
    backend: str | None = None,
) -> dict[str, Any]:
    """Compare ``model`` (a ``moba convert`` output) with MoBA vs full attention; print and save the result.

    ``text``: a text file, or None for generated text. ``dtype`` ``auto`` is bfloat16 on CUDA, float32 on
    CPU; ``seq`` (tokens) defaults to 1024 on CPU, 8192 on CUDA. Returns the result dict.
    """
    import torch

    from moba_cli.integrations.model_compare import compare_model
    from moba_cli.results import check_out, make_result, write_result

    path = Path(model)
    if not path.is_dir():
        raise MobaError(f"--model {path} is not a directory")
    dev = resolve_device(device)
    if dtype.lower() == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        dt = parse_dtype(dtype)
    n = seq if seq is not None else DEFAULT_SEQ.get(dev.type, 1024)
    if n < 2:
        raise MobaError(f"--seq must be at least 2 tokens, got {n}")
    check_out(out, "results/compare")  # a bad --out fails before the model is loaded
    if dev.type == "cpu" and n > 16384:
        console.print(f"[yellow]note:[/] {n} tokens through a model on CPU is slow; expect minutes",
                      highlight=False)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a command prints its own report; no weight-loading bars
    config, records, summary, notes = compare_model(path, text, device=dev, dtype=dt, seq=n, backend=backend)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    result = make_result("compare-model", config, records, summary)
    result["summary"]["notes"] = notes
    file = write_result(result, out, "results/compare")
    _print(config, records, summary, file)
    return result


def _print(config: dict[str, Any], records: list[dict[str, Any]], summary: dict[str, Any], file: Path) -> None:
    console.print(
        f"[bold]{config['model']}[/]: {summary['tokens']} tokens ({config['tokenizer']}, text: {config['text']}), "
        f"{config['dtype']} on {config['device']}; chunk {config['chunk_size']}, top-k {config['topk']}, "
        f"{summary['blocks']} blocks, {100 * summary['sparsity_moba_layer']:.1f}% of causal pairs skipped "
        "per MoBA layer",
        highlight=False,
    )
    table = Table(title="hidden states: MoBA vs full attention (same weights)", title_justify="left")
    for col in ("state", "attention", "max abs", "rel L2", "cos mean", "cos min"):
        table.add_column(col, justify="right" if col not in ("state", "attention") else "left")
    for r in records:
        table.add_row(
            r["name"], r["attention"], f"{r['max_abs']:.3g}", f"{r['rel_l2']:.3g}",
            f"{r['cosine_mean']:.6f}", f"{r['cosine_min']:.6f}",
        )
    console.print(table)
    lg = summary["logits"]
    console.print(
        f"logits: max abs {lg['max_abs']:.3g}, rel L2 {lg['rel_l2']:.3g}, top-1 agreement "
        f"{100 * lg['top1_agreement']:.2f}%, KL(full||MoBA) {lg['kl_full_moba_mean']:.3g} per token",
        highlight=False,
    )
    console.print(
        f"perplexity: MoBA {summary['ppl_moba']:.4g}, full {summary['ppl_full']:.4g} "
        f"(ratio {summary['ppl_ratio']:.4f})",
        highlight=False,
    )
    console.print(f"result: {file}", highlight=False, soft_wrap=True)
