"""`moba train`: train a MoBA or full-attention model from a YAML recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moba_cli.commands._common import console, err_console, user_errors

HELP = (
    "Train a Llama-architecture model with MoBA, full or hybrid attention from a YAML recipe.\n\n"
    "The run folder (log.out, default runs/<name>) receives the resolved recipe, metrics.jsonl (loss, lr, "
    "grad norm, tokens/s, MFU, memory, validation loss and loss by position), checkpoints/step-N/ (Hugging "
    "Face directories that moba_cli.load_model and from_pretrained load, tokenizer included) and result.json. "
    "A killed run continues with --resume, with the same data order and the same losses.\n\n"
    "Recipes are in recipes/ (smoke.yaml runs in seconds on a CPU); --explain lists every field. With "
    "distributed.gpus > 1 the command relaunches itself under torchrun (or run torchrun yourself); the "
    "global batch stays train.batch_size rows.\n\n"
    "Examples:\n\n"
    "  moba train recipes/smoke.yaml --set data.path=data/smoke\n\n"
    "  moba train recipes/moba-then-full.yaml --set train.steps=2000 --set attention.switch_at=0.9\n\n"
    "  torchrun --nproc_per_node 2 -m moba_cli train recipes/scaling-tiny.yaml --set distributed.gpus=2"
)


def train(
    recipe: Annotated[Path | None, typer.Argument(metavar="RECIPE", help="Recipe YAML file.")] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a field: key.sub=value (repeatable), e.g. --set train.steps=50."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in log.out from its checkpoint.")] = False,
    explain: Annotated[bool, typer.Option("--explain", help="List every recipe field with its meaning.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Validate the recipe and print it; train nothing.")] = False,
) -> None:
    with user_errors():
        from moba_cli.errors import MobaError

        if explain:
            print_fields()
            return
        if recipe is None:
            raise MobaError("give a RECIPE file (see recipes/), or --explain for the fields")
        from moba_cli.train.config import load_recipe
        from moba_cli.train.distributed import relaunch, under_torchrun
        from moba_cli.train.validate import validate

        spec = load_recipe(recipe, sets)
        validate(spec)
        if check:
            import yaml

            console.print(yaml.safe_dump(spec.to_dict(), sort_keys=False), highlight=False)
            return
        if spec.distributed.gpus > 1 and not under_torchrun():
            import sys

            code = relaunch(spec.distributed.gpus, ["train", *sys.argv[2:]])
            raise typer.Exit(code)
        from moba_cli.train.loop import train as run_train

        result = run_train(spec, resume=resume, console=err_console)
        import os

        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
            val = result["summary"]["final_val_loss"]
            text = f"{val:.4f}" if val is not None else "n/a (no validation tokens)"
            console.print(f"final validation loss {text}; run folder {spec.run_dir}", highlight=False)


def print_fields() -> None:
    from rich.markup import escape
    from rich.table import Table

    from moba_cli.train.config import field_help

    table = Table("field", "default", "meaning", show_lines=False)
    for key, text, default in field_help():
        table.add_row(key, escape(repr(default)), escape(text))
    console.print(table)
