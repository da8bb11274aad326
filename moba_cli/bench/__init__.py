"""``moba bench``: MoBA against dense attention, timed carefully, checked first, written as JSON/CSV/PNG.

Modules: :mod:`.case` (the shape of one measurement), :mod:`.presets` (options -> :class:`BenchConfig`),
:mod:`.providers` (what is timed), :mod:`.flex_moba` (MoBA with FlexAttention), :mod:`.check` (float32
spot-checks), :mod:`.flops` (work counted), :mod:`.runner` (timing, memory, OOM, estimates), :mod:`.report`
(table, CSV, plots, summary).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moba_cli.bench.presets import BenchConfig, build_config
from moba_cli.bench.report import print_report, summarize, write_csv, write_plots
from moba_cli.bench.runner import Runner, add_speedups
from moba_cli.results import check_out, collect_env, make_result, result_path, slug, write_result

__all__ = ["BenchConfig", "build_config", "default_dir", "run_bench"]


def default_dir(env: dict) -> Path:
    """``results/bench/<gpu-name-slug>/`` (``cpu`` without a GPU), relative to the current directory."""
    return Path("results") / "bench" / (slug(env["gpu"]) if env.get("gpu") else "cpu")


def _json_path(result: dict, out: str | None, folder: Path) -> Path:
    """The file :func:`write_result` will write, known in advance so CSV/PNG can share its stem."""
    return result_path(result["kind"], out, folder, result["created"])


def run_bench(config: BenchConfig, console: Console, progress_console: Console | None = None) -> Path:
    """Run every case, print the table, write ``<stem>.json``, ``<stem>.csv`` and plots; return the JSON path."""
    import torch

    from moba_cli.utils.devices import resolve_device

    if config.device != "cpu":
        dev = resolve_device(config.device)  # one clear line when there is no GPU
        if dev.index is not None:
            torch.cuda.set_device(dev)
    env = collect_env()
    total = len(config.cases()) * len(config.providers)
    pconsole = progress_console or console
    progress = Progress(
        TextColumn("[bold]bench[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=pconsole, transient=True, disable=not pconsole.is_terminal,
    )
    done = [0]
    # The final path is fixed before the run so that a partial file can sit beside it: long runs that are
    # interrupted (a time limit, Ctrl-C) keep every finished measurement in <stem>.partial.json.
    path = _json_path(make_result("bench", {}, [], env=env), config.out, default_dir(env))
    check_out(config.out, default_dir(env))  # a bad --out fails now, not after the first measurement
    partial = path.with_suffix(".partial.json")
    runner = Runner(config)
    with progress, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*without torch.compile.*")
        warnings.filterwarnings("ignore", message=".*unfused implementation.*")
        task = progress.add_task("", total=total)

        def step(label: str, rec: dict) -> None:
            done[0] += 1
            if pconsole.is_terminal:
                progress.update(task, advance=1, description=f"{label}: {rec['status']}")
            elif rec["status"] != "skipped":  # a log file gets one line per measurement instead of a bar
                ms = f" {rec['ms']:.4g} ms" if rec["ms"] is not None else ""
                pconsole.print(f"[{done[0]}/{total}] {label}: {rec['status']}{ms}", highlight=False,
                               soft_wrap=True)
            snapshot = make_result("bench", config.to_dict(), list(runner.records),
                                   {"partial": True, "records_done": len(runner.records)}, env=env)
            write_result(snapshot, partial, default_dir(env))

        runner.on_step = step
        records = runner.run()
    add_speedups(records)
    summary = summarize(records)
    summary["notes"] = list(config.notes)
    config_dict = config.to_dict()
    result = make_result("bench", config_dict, records, summary, env=env)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.with_suffix("")
    files = {"json": str(path), "csv": str(write_csv(records, stem.with_suffix(".csv")))}
    if config.plots:
        plots, note = write_plots(records, stem)
        files["plots"] = [str(p) for p in plots]
        if note:
            summary["notes"].append(note)
    summary["files"] = files
    write_result(result, path, default_dir(env))
    partial.unlink(missing_ok=True)
    device = env.get("gpu") or "CPU (smoke run: timings are not meaningful)"
    print_report(records, console, title=f"moba bench on {device}")
    for note in summary["notes"]:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"wrote {path}, {files['csv']}" + "".join(f", {p}" for p in files.get("plots", [])),
                  highlight=False, soft_wrap=True)
    return path
