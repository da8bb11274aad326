"""`moba eval needle|ruler|loss`: does the model still find what is far back in its context?

Thin commands: parse and check the options, call :mod:`moba_cli.evals`, print a table, write the result.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from moba_cli.commands._common import DeviceOpt, console, group, parse_dtype, resolve_device, user_errors
from moba_cli.errors import MobaError

DEFAULT_OUT = "results/evals"

app = group(
    "Evaluate a model with MoBA against full attention on the same weights: needle in a haystack, RULER "
    "(through lm-eval) and loss by position. Offline; every command writes a JSON result and plots."
)

ModelOpt = Annotated[Path, typer.Option("--model", help="Model directory (moba convert/train output or a plain "
                                        "checkpoint with --chunk/--topk), with its tokenizer.")]
AttnOpt = Annotated[str, typer.Option("--attn", help="moba, full, or both (same weights, same prompts).")]
OutOpt = Annotated[Path | None, typer.Option("--out", help=f"Folder (or .json file) for the result and plots "
                                            f"(default: {DEFAULT_OUT}).")]
ChunkOpt = Annotated[str | None, typer.Option("--chunk", help="Override the MoBA block size (e.g. 4k).")]
TopkOpt = Annotated[int | None, typer.Option("--topk", help="Override MoBA's top-k (blocks per query).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (bfloat16 on CUDA, float32 on CPU), bf16, fp16, fp32.")]
NoPlotOpt = Annotated[bool, typer.Option("--no-plot", help="Skip the PNG plots.")]


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True,
    )


def _setup(model: Path, attn: str, chunk: str | None, topk: int | None, device: str, dtype: str, out: Path | None):
    """Checks every option that can fail cheaply: ``(attns, loader)``; ``loader()`` loads the model."""
    import torch

    from moba_cli.evals.model import check_model_dir, load, parse_attn
    from moba_cli.results import check_out
    from moba_cli.utils.sizes import parse_size

    attns = parse_attn(attn)
    check_model_dir(model)
    dev = resolve_device(device)
    dt = (torch.bfloat16 if dev.type == "cuda" else torch.float32) if dtype.lower() == "auto" else parse_dtype(dtype)
    chunk_size = None
    if chunk is not None:
        try:
            chunk_size = parse_size(chunk)
        except MobaError as e:
            raise MobaError(f"--chunk: {e}") from None
    if topk is not None and topk < 1:
        raise MobaError(f"--topk must be at least 1, got {topk}")
    check_out(out, DEFAULT_OUT)
    return attns, (lambda: load(model, attns, device=dev, dtype=dt, chunk_size=chunk_size, topk=topk))


def _lengths(text: str, flag: str = "--lengths") -> list[int]:
    from moba_cli.utils.sizes import parse_size_list

    try:
        return sorted(set(parse_size_list(text)))
    except MobaError as e:
        raise MobaError(f"{flag}: {e}") from None


def _model_config(lm: Any) -> dict[str, Any]:
    return {"model": str(lm.path), "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
            "moba": lm.moba, "max_position_embeddings": lm.max_positions}


def _write(
    kind: str, config: dict, records: list, summary: dict, out: Path | None,
    plot: Callable[[Path], list[Path]] | None,
) -> tuple[Path, list[Path]]:
    """Write the plots (named after the result) and then the result JSON. Returns both paths."""
    from moba_cli.results import make_result, write_result

    result = make_result(kind, config, records, summary)
    target = Path(out) if out is not None else Path(DEFAULT_OUT)
    stamp = result["created"].replace(":", "").replace("-", "")
    json_path = target if target.suffix == ".json" else target / f"{kind}-{stamp}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    pngs = plot(json_path.with_suffix("")) if plot is not None else []
    result["summary"]["files"] = [str(p) for p in pngs]
    return write_result(result, json_path, DEFAULT_OUT), pngs


NEEDLE_HELP = (
    "Needle in a haystack: a grid of context length x needle depth, several samples per cell.\n\n"
    "Each prompt is exactly LENGTH tokens (the model's tokenizer); the needle (a key and a random 7-digit "
    "value) sits at the exact token depth asked for, and the question comes last. Two scores per cell: "
    "exact match of the value in the greedy answer, and the rank / log-probability of the true value "
    "against distractor values (useful for small base models). With --attn both the same prompts run with "
    "MoBA and full attention; heatmaps of each and of their difference are written beside the JSON.\n\n"
    "Finished cells are kept in a partial file in the output folder: an interrupted run continues with "
    "--resume. A cell that runs out of GPU memory is recorded as such and the run goes on.\n\n"
    "Examples:\n\n"
    "  moba eval needle --model ./llama-moba --attn both --lengths 4k,8k,16k,32k --depths 11 --samples 4\n\n"
    "  moba eval needle --model ./ckpt --chunk 512 --topk 3 --haystack code --out results/evals/ckpt"
)


@app.command("needle", help=NEEDLE_HELP, short_help="Needle-in-a-haystack grid, MoBA vs full attention.")
def needle(
    model: ModelOpt,
    attn: AttnOpt = "both",
    lengths: Annotated[str, typer.Option("--lengths", help="Context lengths, e.g. 4k,8k,16k,32k.")] = "4k,8k,16k,32k",
    depths: Annotated[str, typer.Option("--depths", help="Number of depths 0..100% (1-101), or a list 0,50,100.")]
    = "11",
    samples: Annotated[int, typer.Option("--samples", help="Samples per cell (different keys and values).")] = 4,
    haystack: Annotated[str, typer.Option("--haystack", help="noise (RULER filler), code (this Python's stdlib "
                                          "sources) or a text FILE.")] = "noise",
    needle_t: Annotated[str | None, typer.Option("--needle", help="Needle template with {key} and {value}.")]
    = None,
    question_t: Annotated[str | None, typer.Option("--question", help="Question template with {key}; ends where "
                                                   "the answer starts.")] = None,
    distractors: Annotated[int, typer.Option("--distractors", help="Distractor values for the rank score.")] = 9,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the keys and values.")] = 0,
    answer_tokens: Annotated[int, typer.Option("--answer-tokens", help="Greedy tokens beyond the value's own "
                                               "length.")] = 8,
    max_batch_tokens: Annotated[str, typer.Option("--max-batch-tokens", help="Memory budget: prompt tokens run "
                                                  "together (samples of one cell are batched up to it).")] = "64k",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run with the same settings.")]
    = False,
    chunk: ChunkOpt = None,
    topk: TopkOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    out: OutOpt = None,
    no_plot: NoPlotOpt = False,
) -> None:
    with user_errors():
        from moba_cli.evals import haystack as hs
        from moba_cli.evals.needle import DEFAULT_NEEDLE, DEFAULT_QUESTION, Templates, parse_depths
        from moba_cli.evals.needle_run import NeedleConfig, prepare, run_needle, summarize
        from moba_cli.evals.state import PartialRun, out_folder
        from moba_cli.utils.sizes import parse_size

        lens = _lengths(lengths)
        deps = parse_depths(depths)
        if samples < 1:
            raise MobaError(f"--samples must be at least 1, got {samples}")
        if answer_tokens < 0:
            raise MobaError(f"--answer-tokens must be 0 or more, got {answer_tokens}")
        if distractors < 1:
            raise MobaError(f"--distractors must be at least 1, got {distractors}")
        templates = Templates(needle_t or DEFAULT_NEEDLE, question_t or DEFAULT_QUESTION)
        templates.check()
        hs.check_source(haystack)
        budget = parse_size(max_batch_tokens)
        if not no_plot:
            from moba_cli.evals.plots import check_matplotlib

            check_matplotlib()
        attns, loader = _setup(model, attn, chunk, topk, device, dtype, out)
        lm = loader()
        cfg = NeedleConfig(lens, deps, samples, hs.describe(haystack), templates, distractors, seed, budget,
                           answer_tokens)
        prepare(lm, cfg)  # bad lengths fail before any file is written
        config = {**_model_config(lm), "attn": attns, **cfg.settings(), "max_batch_tokens": budget}
        state = PartialRun(out_folder(out, DEFAULT_OUT), "eval-needle", {**config, "model": str(lm.path.resolve())},
                           ("attn", "length", "depth"))
        notes = state.open(resume)
        total = len(lens) * len(deps) * len(attns) * samples
        try:
            with progress_bar() as bar:
                task = bar.add_task("needle", total=total)
                records, run_notes = run_needle(lm, cfg, attns, state,
                                                lambda n, d: bar.update(task, advance=n, description=d))
        except KeyboardInterrupt:
            console.print(f"interrupted: {len(state.done)} finished cell(s) kept in {state.path}; run the same "
                          "command with --resume to continue", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        notes += run_notes
        summary = {"scores": summarize(records, attns, lens), "notes": notes}
        title = f"needle: {lm.path.name}"
        plot = None
        if not no_plot:
            from moba_cli.evals.plots import needle_heatmaps

            plot = lambda stem: needle_heatmaps(records, attns, lens, deps, stem, title)  # noqa: E731
        path, pngs = _write("eval-needle", config, records, summary, out, plot)
        state.finish()
        _needle_table(summary["scores"], attns, lens)
        for note in notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
        console.print(f"result: {path}" + (f"; plots: {', '.join(map(str, pngs))}" if pngs else ""),
                      highlight=False, soft_wrap=True)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _needle_table(scores: dict[str, Any], attns: list[str], lengths: list[int]) -> None:
    from moba_cli.utils.sizes import format_size

    table = Table(title="needle: mean over depths (exact match / true value ranked first)", title_justify="left")
    table.add_column("length", justify="right")
    for a in attns:
        table.add_column(f"{a} exact", justify="right")
        table.add_column(f"{a} rank-1", justify="right")
    if attns == ["moba", "full"]:
        table.add_column("Δ exact", justify="right")
    for n in lengths:
        row = [format_size(n)]
        got = {a: scores[a]["per_length"].get(str(n)) for a in attns}
        for a in attns:
            row += [_fmt(got[a] and got[a]["exact"]), _fmt(got[a] and got[a]["rank1"])]
        if attns == ["moba", "full"]:
            both = got["moba"] and got["full"]
            row.append(_fmt(got["moba"]["exact"] - got["full"]["exact"]) if both else "-")
        table.add_row(*row)
    console.print(table)


LOSS_HELP = (
    "Next-token loss by position over long held-out documents, MoBA beside full attention.\n\n"
    "The documents are --docs consecutive windows of --seq tokens of the data: `code` (this Python's "
    "standard-library sources, found on the machine) or a text FILE long enough for them. The loss is "
    "averaged in --buckets equal position buckets: MoBA's weak spot, if any, is the last bucket of a long "
    "context. Writes the result JSON and a line plot of loss against position.\n\n"
    "Examples:\n\n"
    "  moba eval loss --model ./llama-moba --attn both --seq 32k --buckets 8\n\n"
    "  moba eval loss --model ./ckpt --chunk 512 --topk 3 --data held_out.txt --seq 8k --docs 4"
)


@app.command("loss", help=LOSS_HELP, short_help="Loss by position bucket, MoBA vs full attention.")
def loss(
    model: ModelOpt,
    attn: AttnOpt = "both",
    data: Annotated[str, typer.Option("--data", help="code (stdlib sources on this machine) or a text FILE.")]
    = "code",
    seq: Annotated[str, typer.Option("--seq", help="Tokens per document (e.g. 32k).")] = "32k",
    buckets: Annotated[int, typer.Option("--buckets", help="Position buckets.")] = 8,
    docs: Annotated[int, typer.Option("--docs", help="Documents (windows of --seq tokens) averaged.")] = 1,
    chunk: ChunkOpt = None,
    topk: TopkOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    out: OutOpt = None,
    no_plot: NoPlotOpt = False,
) -> None:
    with user_errors():
        from moba_cli.evals import haystack as hs
        from moba_cli.evals.loss import LossConfig, documents, run_loss
        from moba_cli.utils.sizes import parse_size

        if data == "noise":
            raise MobaError("--data noise is too predictable to measure loss; use code or a FILE")
        hs.check_source(data)
        try:
            n = parse_size(seq)
        except MobaError as e:
            raise MobaError(f"--seq: {e}") from None
        cfg = LossConfig(data, n, buckets, docs)
        if n < 2:
            raise MobaError(f"--seq must be at least 2 tokens, got {n}")
        if docs < 1:
            raise MobaError(f"--docs must be at least 1, got {docs}")
        if not 1 <= buckets <= n - 1:
            raise MobaError(f"--buckets must be between 1 and {n - 1}, got {buckets}")
        if not no_plot:
            from moba_cli.evals.plots import check_matplotlib

            check_matplotlib()
        attns, loader = _setup(model, attn, chunk, topk, device, dtype, out)
        lm = loader()
        documents(lm, cfg)  # a too-short FILE fails before the long work
        notes = [*lm.notes]
        from moba_cli.evals.model import length_notes

        notes += length_notes(lm, [n])
        with progress_bar() as bar:
            task = bar.add_task("loss", total=len(attns) * docs)
            records, summary = run_loss(lm, cfg, attns, lambda k, d: bar.update(task, advance=k, description=d))
        summary["notes"] = notes
        config = {**_model_config(lm), "attn": attns, "data": hs.describe(data), "seq": n, "buckets": buckets,
                  "docs": docs}
        plot = None
        if not no_plot:
            from moba_cli.evals.plots import loss_plot

            ok = [a for a in attns if any(r.get("attn") == a and r["status"] == "ok" for r in records)]
            plot = lambda stem: [loss_plot(records, ok, stem.parent / f"{stem.name}.png",  # noqa: E731
                                           f"loss by position: {lm.path.name}, {seq} tokens")]
        path, pngs = _write("eval-loss", config, records, summary, out, plot)
        _loss_table(records, attns)
        for note in notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
        console.print(f"result: {path}" + (f"; plot: {pngs[0]}" if pngs else ""), highlight=False, soft_wrap=True)


def _loss_table(records: list[dict[str, Any]], attns: list[str]) -> None:
    table = Table(title="next-token loss by position (nats)", title_justify="left")
    table.add_column("positions", justify="right")
    for a in attns:
        table.add_column(a, justify="right")
    both = attns == ["moba", "full"]
    if both:
        table.add_column("moba - full", justify="right")
    rows: dict[tuple[int, int], dict[str, float]] = {}
    for r in records:
        if r["status"] == "ok":
            rows.setdefault((r["start"] + 1, r["end"]), {})[r["attn"]] = r["loss"]
    for (a, b), got in rows.items():
        cells = [f"{a}-{b}"] + [f"{got[x]:.4f}" if x in got else "OOM" for x in attns]
        if both:
            cells.append(f"{got['moba'] - got['full']:+.4f}" if len(got) == 2 else "-")
        table.add_row(*cells)
    console.print(table)


RULER_HELP = (
    "RULER through EleutherAI's lm-eval, offline, MoBA beside full attention on the same weights.\n\n"
    "Needs lm-eval: pip install 'lm-eval\\[hf,ruler]==0.4.13' (or the moba-cli\\[eval] extra). The default tasks "
    "build their data offline: niah_single_1, niah_multikey_2, niah_multikey_3, ruler_vt, ruler_cwe, "
    "ruler_fwe. The essay tasks (niah_single_2/3, niah_multikey_1, niah_multivalue, niah_multiquery) run "
    "with --essay-haystack FILE on your own prose instead of RULER's Paul Graham essays (so their scores "
    "are not RULER's); the QA tasks download their data and are not offered. --samples picks that many "
    "samples at every length. The network is blocked during the run; each task has a time limit.\n\n"
    "Writes the result JSON (score per task per length, mean per length) and lm-eval's own output beside it.\n\n"
    "Examples:\n\n"
    "  moba eval ruler --model ./llama-moba --attn both --lengths 4k,8k,16k --samples 20\n\n"
    "  moba eval ruler --model ./llama-moba --tasks niah_single_1,niah_single_2 --essay-haystack essays.txt"
)


@app.command("ruler", help=RULER_HELP, short_help="RULER (lm-eval) scores per length, MoBA vs full attention.")
def ruler(
    model: ModelOpt,
    attn: AttnOpt = "both",
    lengths: Annotated[str, typer.Option("--lengths", help="Context lengths, e.g. 4k,8k,16k.")] = "4k,8k,16k",
    tasks: Annotated[str, typer.Option("--tasks", help="default, all, or task names separated by commas.")]
    = "default",
    samples: Annotated[int, typer.Option("--samples", help="Samples per task and length (1-500).")] = 20,
    essay_haystack: Annotated[Path | None, typer.Option("--essay-haystack", help="Local prose FILE replacing "
                                                        "RULER's essay haystack (enables the essay tasks).")] = None,
    time_limit: Annotated[float, typer.Option("--time-limit", help="Seconds per task and attention (0: none).")]
    = 3600.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="lm-eval batch size.")] = 1,
    chunk: ChunkOpt = None,
    topk: TopkOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    out: OutOpt = None,
) -> None:
    with user_errors():
        import json

        from moba_cli.evals import ruler as rl
        from moba_cli.evals.haystack import check_source

        version = rl.check_lm_eval()
        essay = None
        if essay_haystack is not None:
            check_source(str(essay_haystack))
            essay = str(essay_haystack.resolve())
        names = rl.parse_tasks(tasks, essay)
        lens = _lengths(lengths)
        if not 1 <= samples <= rl.SAMPLES_PER_LENGTH:
            raise MobaError(f"--samples must be between 1 and {rl.SAMPLES_PER_LENGTH}, got {samples}")
        if batch_size < 1 or time_limit < 0:
            raise MobaError("--batch-size must be at least 1 and --time-limit 0 or more")
        attns, loader = _setup(model, attn, chunk, topk, device, dtype, out)
        lm = loader()
        from moba_cli.evals.model import length_notes

        notes = length_notes(lm, lens)
        if essay:
            notes.append(f"essay tasks ran on {essay}, not RULER's Paul Graham essays: their scores are not RULER's")
        with progress_bar() as bar:
            task = bar.add_task("ruler", total=len(attns) * len(names) * len(lens) * samples)
            records, raw = rl.run_ruler(lm, names, lens, samples, attns, essay_haystack=essay, time_limit=time_limit,
                                        batch_size=batch_size,
                                        tick=lambda k, d: bar.update(task, advance=k, description=d))
        summary = {**rl.summarize(records, raw, attns, lens), "notes": notes, "lm_eval": version}
        short = sorted({(r["task"], r["length"]) for r in records if r["status"] == "ok" and r["samples"] != samples})
        if short:
            notes.append("lm-eval scored another number of samples than asked for "
                         f"{', '.join(f'{t} at {n}' for t, n in short)} (it skips samples that do not fit a "
                         "length, which shifts the per-length picks); see 'samples' in each record")
        if summary.get("same_prompts") is False:
            notes.append("MoBA and full attention did not get identical prompts from lm-eval")
        failed = {(r["attn"], r["task"]): r["error"] for r in records if r["status"] in ("error", "timeout", "oom")}
        notes += [f"{task} ({attn}): {err}" for (attn, task), err in failed.items()]
        config = {**_model_config(lm), "attn": attns, "tasks": names, "lengths": lens, "samples": samples,
                  "essay_haystack": essay, "time_limit": time_limit, "batch_size": batch_size}

        def write_raw(stem: Path) -> list[Path]:
            path = stem.parent / f"{stem.name}-lm_eval.json"
            path.write_text(json.dumps(raw, indent=1, default=str) + "\n")
            return [path]

        path, extra = _write("eval-ruler", config, records, summary, out, write_raw)
        _ruler_table(records, summary, attns, names, lens)
        for note in notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
        console.print(f"result: {path}; lm-eval output: {extra[0]}", highlight=False, soft_wrap=True)


def _ruler_table(records: list[dict[str, Any]], summary: dict, attns: list[str], tasks: list[str], lengths: list[int]):
    from moba_cli.utils.sizes import format_size

    table = Table(title="RULER score (%) per task and length", title_justify="left")
    table.add_column("task")
    for n in lengths:
        for a in attns:
            table.add_column(f"{format_size(n)} {a}", justify="right")
    got = {(r["attn"], r["task"], r["length"]): r for r in records}

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        return f"{100 * r['score']:.1f}" if r["score"] is not None else r["status"]

    for t in tasks:
        table.add_row(t, *[cell(got.get((a, t, n))) for n in lengths for a in attns])
    mean = summary["mean"]
    table.add_row("mean", *[_fmt(None if mean[a][str(n)] is None else 100 * mean[a][str(n)]) for n in lengths
                            for a in attns], style="bold")
    console.print(table)
