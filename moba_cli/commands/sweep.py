"""`moba sweep`: a grid of `moba train` runs and the scaling-law fit of loss against compute."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moba_cli.commands._common import console, err_console, user_errors

HELP = (
    "Train a grid of recipe variants and fit the loss against compute per attention kind.\n\n"
    "The recipe's sweep: section lists values per field, e.g. sweep: {model.size: \\[20M, 50M, 100M, 200M], "
    "attention.kind: \\[moba, full]}; every combination is a `moba train` run in SWEEP/points/<name>/. "
    "Finished points are skipped and started ones resumed, so rerunning the command continues a sweep. "
    "--gpus N runs N points side by side, one per GPU.\n\n"
    "SWEEP/summary.json (kind sweep) holds a record per point (attn, size, parameters, tokens, compute, "
    "final and trailing validation loss), the fits L(C) = a*C^-b (+ e with 4+ points) with their standard "
    "errors, and the MoBA-minus-full loss gap per size; loss_vs_compute.png and trailing_loss.png plot them.\n\n"
    "Examples:\n\n"
    "  moba sweep recipes/scaling-tiny.yaml --out runs/scaling-tiny --gpus 1\n\n"
    "  moba sweep recipes/smoke.yaml --set 'sweep={attention.kind: \\[moba, full]}' --out runs/smoke-sweep"
)


def sweep(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML with a sweep: section.")],
    sets: Annotated[
        list[str] | None, typer.Option("--set", help="Override a field for every point: key.sub=value (repeatable).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Sweep folder. (default: runs/sweep-<recipe name>)")
    ] = None,
    gpus: Annotated[int, typer.Option("--gpus", help="Run this many points at once, one per GPU (0: in turn, "
                                                     "in this process).")] = 0,
    summarize_only: Annotated[
        bool, typer.Option("--summarize", help="Only rebuild summary.json and plots from finished points.")
    ] = False,
) -> None:
    with user_errors():
        from moba_cli.errors import MobaError
        from moba_cli.train.config import load_recipe
        from moba_cli.train.sweep import point_recipes, run_sweep, summarize

        if gpus < 0:
            raise MobaError("--gpus must be 0 or more")
        spec = load_recipe(recipe, sets)
        sweep_dir = out if out is not None else Path("runs") / f"sweep-{spec.name}"
        if sweep_dir.exists() and not sweep_dir.is_dir():
            raise MobaError(f"--out {sweep_dir} is a file, not a folder")
        if summarize_only:
            result = summarize(spec, point_recipes(spec, sweep_dir), sweep_dir)
        else:
            result = run_sweep(spec, sweep_dir, gpus=gpus, console=err_console)
        print_summary(result, sweep_dir)


def print_summary(result: dict, sweep_dir: Path) -> None:
    from rich.table import Table

    table = Table("point", "attn", "size", "params", "tokens", "compute", "val loss", "trailing")
    for r in result["records"]:
        trailing = f"{r['trailing_val_loss']:.4f}" if r["trailing_val_loss"] is not None else "-"
        val = f"{r['final_val_loss']:.4f}" if r["final_val_loss"] is not None else "-"
        table.add_row(r["point"], r["attn"], str(r["size"]), f"{r['params']:,}", f"{r['tokens']:,}",
                      f"{r['compute']:.3g}", val, trailing)
    console.print(table)
    for attn, f in result["summary"]["fits"].items():
        err = f" ± {f['b_err']:.4f}" if f.get("b_err") is not None else ""
        extra = f" + {f['e']:.3f}" if f.get("e") is not None else ""
        console.print(f"{attn}: L(C) = {f['a']:.4g} * C^-({f['b']:.4f}{err}){extra}  [{f['method']}]",
                      highlight=False)
    for g in result["summary"]["gaps"]:
        console.print(f"size {g['size']}: MoBA - full = {g['gap']:+.4f}", highlight=False)
    console.print(f"summary: {sweep_dir / 'summary.json'}", highlight=False)
