"""`moba compare`: MoBA against full attention on the same inputs (logic in :mod:`moba_cli.analysis`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from moba_cli.commands._common import console, fail, parse_dtype, resolve_device, user_errors
from moba_cli.errors import MobaError

HELP = (
    "Check MoBA against full causal attention on the same inputs.\n\n"
    "Runs MoBA and dense attention (torch SDPA) on random q/k/v (seeded randn) or on tensors saved with "
    "--qkv, and reports: the output error of MoBA against full attention (max abs, relative L2); the "
    "softmax-mass recall (per query and head, the share of its full attention mass inside the blocks MoBA "
    "chose: mean and 5th percentile, next to the best any choice of as many blocks could reach); the "
    "sparsity (share of causal query/key pairs MoBA skips); and the equivalence check: with top-k covering "
    "every block MoBA must equal dense float32 attention within the dtype's rounding (exit code 1 if not).\n\n"
    "Defaults on CPU: 2k tokens, 4 heads of 64, chunk 128, top-k 3, float32, naive backend (seconds). "
    "On CUDA: 32k tokens, 8 heads of 128, chunk 2048, top-k 3, bfloat16, triton backend. "
    "Random inputs have no structure for the gate to find, so their recall stays near the share of keys "
    "attended; use --qkv with real activations (or --model) to see the gate on a real model.\n\n"
    "Writes a JSON result (default results/compare/). With --model DIR [--text FILE] it compares a whole "
    "checkpoint instead."
)


def compare(
    seq: Annotated[str | None, typer.Option(help="Tokens per sequence: 4096, 4k, 128k, 1m. (default: 2k on "
                                            "CPU, 32k on CUDA)")] = None,
    batch: Annotated[int | None, typer.Option(help="Sequences. (default: 1)")] = None,
    heads: Annotated[int | None, typer.Option(help="Query heads. (default: 4 on CPU, 8 on CUDA)")] = None,
    kv_heads: Annotated[int | None, typer.Option(help="Key/value heads; must divide --heads (fewer: GQA/MQA). "
                                                 "(default: --heads)")] = None,
    head_dim: Annotated[int | None, typer.Option(help="Head dim. (default: 64 on CPU, 128 on CUDA)")] = None,
    chunk: Annotated[str | None, typer.Option(help="MoBA block size in keys (e.g. 512, 4k). (default: 128 on "
                                              "CPU, 2048 on CUDA)")] = None,
    topk: Annotated[int | None, typer.Option(help="Blocks per query, counting its own block. "
                                             "(default: 3)")] = None,
    dtype: Annotated[str, typer.Option(help="auto, bfloat16 (bf16), float16 (fp16), float32 (fp32). auto: "
                                       "bfloat16 on CUDA, float32 on CPU; with --qkv the file's dtype.")] = "auto",
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")] = "auto",
    backend: Annotated[str, typer.Option(help="MoBA backend: auto (triton on CUDA, naive on CPU), naive or "
                                         "triton. With --model, auto keeps the checkpoint's choice.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the random inputs (and of sampled recall rows).")] = 0,
    qkv: Annotated[Path | None, typer.Option(help="safetensors file with tensors q, k, v ([B,S,H,D] or "
                                             "[S,H,D]) instead of random inputs.")] = None,
    model: Annotated[Path | None, typer.Option(help="Compare a whole transformers checkpoint DIR "
                                               "instead.")] = None,
    text: Annotated[Path | None, typer.Option(help="Text FILE to run through --model.")] = None,
    out: Annotated[Path | None, typer.Option(help="JSON file or folder for the result. "
                                             "(default: results/compare/)")] = None,
) -> None:
    with user_errors():
        from moba_cli.ops.moba.options import KernelOptions

        KernelOptions.from_env()  # a malformed MOBA_* kernel variable stops the command before any work
        if model is not None:
            _model_compare(model, text, out, device, dtype, seq, backend,
                           other={"--qkv": qkv, "--batch": batch, "--heads": heads, "--kv-heads": kv_heads,
                                  "--head-dim": head_dim, "--chunk": chunk, "--topk": topk})
            return
        if text is not None:
            raise MobaError("--text needs --model (it is the text run through the model)")
        from moba_cli.analysis.sparse_vs_full import run_compare
        from moba_cli.results import check_out, make_result, write_result

        setup, qkv_tensors = _resolve(seq, batch, heads, kv_heads, head_dim, chunk, topk, dtype, device, backend,
                                      seed, qkv)
        check_out(out, "results/compare")  # a bad --out fails now, not after the run
        for note in setup.notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
        config, records, summary = _with_progress(lambda p: run_compare(setup, qkv_tensors, progress=p))
        path = write_result(make_result("compare", config, records, summary), out, "results/compare")
        _print_report(config, records, summary, path)
        eq = summary["equivalence"]
        if not eq["passed"] and eq.get("nonfinite_rows"):
            raise fail(f"equivalence check failed: {eq['nonfinite_rows']} (row, head) outputs of MoBA with every "
                       "block or of its float32 reference are NaN or infinite")
        if not eq["passed"]:
            raise fail(
                f"equivalence check failed: MoBA with every block differs from dense attention by relative L2 "
                f"{eq['rel_l2']:.3g} (worst row {eq['worst_row_rel_l2']:.3g}); tolerance "
                f"{eq['tolerance']['rel_l2']:.3g} (worst row {eq['tolerance']['worst_row_rel_l2']:.3g})"
            )


def _model_compare(model, text, out, device, dtype, seq, backend: str, other: dict[str, Any]) -> None:
    given = [name for name, value in other.items() if value is not None]
    if given:
        raise MobaError(f"{', '.join(given)} cannot be combined with --model (the checkpoint defines the shapes)")
    backend = backend.lower()
    if backend not in ("auto", "naive", "triton"):
        raise MobaError(f"unknown backend {backend!r}; choose one of auto, naive, triton")
    try:
        from moba_cli.commands.compare_model import run_model_compare
    except ImportError as e:
        if e.name in ("moba_cli.commands.compare_model", None):
            raise MobaError("comparing a model (--model) is not available in this build yet") from None
        raise MobaError(f"--model needs the package {e.name!r}, which is not installed "
                        "(pip install 'moba-cli[hf]')") from None
    # backend None keeps the checkpoint's own choice (config.moba.backend, usually auto)
    run_model_compare(model=model, text=text, out=out, device=device, dtype=dtype,
                      seq=_size("--seq", seq) if seq is not None else None,
                      backend=None if backend == "auto" else backend)


def _size(flag: str, text: str) -> int:
    from moba_cli.utils.sizes import parse_size

    try:
        return parse_size(text)
    except MobaError as e:
        raise MobaError(f"{flag}: {e}") from None


def _resolve(seq, batch, heads, kv_heads, head_dim, chunk, topk, dtype, device, backend, seed, qkv):
    """Options -> (CompareSetup, loaded qkv or None), with the device-dependent defaults filled in."""
    from moba_cli.analysis.inputs import (
        DEFAULTS,
        CompareSetup,
        check_sizes,
        default_dtype,
        file_dtype,
        load_qkv,
        pick_backend,
    )

    dev = resolve_device(device)
    base = DEFAULTS["cuda" if dev.type == "cuda" else "cpu"]
    tensors = None
    size = {
        "seq": _size("--seq", seq) if seq is not None else None,
        "batch": batch, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
    }
    if qkv is not None:
        tensors = load_qkv(qkv)
        q, k, _ = tensors
        from_file = {"seq": q.shape[1], "batch": q.shape[0], "heads": q.shape[2], "kv_heads": k.shape[2],
                     "head_dim": q.shape[3]}
        for name, value in size.items():
            if value is not None and value != from_file[name]:
                flag = "--" + name.replace("_", "-")
                raise MobaError(f"{flag} {value} conflicts with the --qkv file, which has {from_file[name]}")
        size = from_file
    else:
        for name in ("seq", "batch", "heads", "head_dim"):
            if size[name] is None:
                size[name] = base[name]
        if size["kv_heads"] is None:
            size["kv_heads"] = size["heads"]
    chunk_n = _size("--chunk", chunk) if chunk is not None else base["chunk"]
    topk_n = topk if topk is not None else base["topk"]
    check_sizes(size["seq"], size["batch"], size["heads"], size["kv_heads"], size["head_dim"], chunk_n, topk_n,
                seed=seed)
    if dtype.lower() == "auto":
        dt = (file_dtype(tensors[0]) if tensors is not None else None) or default_dtype(dev)
    else:
        dt = parse_dtype(dtype)
    chosen, note = pick_backend(backend, dev, size["head_dim"])
    setup = CompareSetup(seq=size["seq"], batch=size["batch"], heads=size["heads"], kv_heads=size["kv_heads"],
                         head_dim=size["head_dim"], chunk=chunk_n, topk=topk_n, dtype=dt, device=dev, backend=chosen,
                         seed=seed, qkv=qkv)
    if note:
        setup.notes.append(note)
    blocks = (setup.seq + chunk_n - 1) // chunk_n
    if blocks <= 1:
        setup.notes.append(f"--seq {setup.seq} fits in one block of --chunk {chunk_n}: MoBA has nothing to skip")
    elif topk_n >= blocks:
        setup.notes.append(f"--topk {topk_n} covers all {blocks} blocks: MoBA is full attention here")
    if chosen == "naive" and dev.type == "cpu" and setup.seq * setup.batch > 32768:
        setup.notes.append("the float32 naive backend on CPU is slow at this length; expect minutes")
    return setup, tensors


def _with_progress(work):
    """Run ``work(progress)`` under a rich status line that names the current stage."""
    with console.status("starting...", spinner="dots") as status:
        def progress(stage: str, frac: float) -> None:
            status.update(f"{stage}..." if frac <= 0 else f"{stage}: {100 * frac:.0f}%")

        return work(progress)


def _num(x: float | None, spec: str) -> str:
    """A figure for the table; ``n/a`` where the result holds null (a value that was not finite)."""
    return "n/a" if x is None else format(x, spec)


def _print_report(config: dict, records: list[dict], summary: dict, path: Path) -> None:
    from rich.table import Table

    from moba_cli.utils.sizes import format_size

    eq = summary["equivalence"]
    console.print(
        f"[bold]MoBA vs full attention[/]  seq {format_size(config['seq'])} x {config['batch']}, "
        f"{config['heads']} heads ({config['kv_heads']} kv) x {config['head_dim']}, chunk {config['chunk']}, "
        f"top-k {config['topk']}, {config['dtype']}, {config['backend']} on {config['device']}",
        highlight=False,
    )
    t = Table(show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("meaning", style="dim")
    sampled = summary["recall_sampled_rows"]
    rows_note = f" ({sampled} sampled rows)" if sampled else ""
    t.add_row("output max abs error", _num(summary["max_abs"], ".3g"), "MoBA vs full (SDPA), same dtype")
    t.add_row("output relative L2", _num(summary["rel_l2"], ".3g"), "||o_moba - o_full|| / ||o_full||")
    t.add_row("recall mean", _num(summary["recall_mean"], ".4f"), "full softmax mass in chosen blocks" + rows_note)
    t.add_row("recall p5", _num(summary["recall_p5"], ".4f"), "5th percentile over queries x heads")
    t.add_row("oracle recall mean", _num(summary["recall_oracle_mean"], ".4f"), "best choice of as many blocks")
    t.add_row("sparsity", f"{100 * summary['sparsity']:.1f}%",
              f"causal pairs skipped ({summary['blocks_per_sequence']} blocks/seq)")
    if summary.get("selection_agreement") is not None:
        t.add_row("gate agreement", f"{100 * summary['selection_agreement']:.2f}%",
                  "kernel's blocks = reference rule's")
    verdict = "[green]passed[/]" if eq["passed"] else "[red]FAILED[/]"
    prefix = ""
    if eq["tokens_per_sequence"] < config["seq"]:
        prefix = f", first {format_size(eq['tokens_per_sequence'])} tokens"
    t.add_row("equivalence", verdict,
              f"top-k=all{prefix}: rel L2 {_num(eq['rel_l2'], '.1e')} <= {eq['tolerance']['rel_l2']:.0e}")
    console.print(t)
    if 1 < len(records) <= 16:
        h = Table(title="per query head", title_justify="left", header_style="bold")
        for col in ("head", "kv", "recall mean", "recall p5", "oracle", "rel L2"):
            h.add_column(col, justify="right")
        for r in records:
            h.add_row(str(r["head"]), str(r["kv_head"]), _num(r["recall_mean"], ".4f"), _num(r["recall_p5"], ".4f"),
                      _num(r["recall_oracle_mean"], ".4f"), _num(r["rel_l2"], ".3g"))
        console.print(h)
    console.print(f"result: {path}  ({summary['seconds']:.1f} s)", highlight=False)
