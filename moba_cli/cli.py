"""The ``moba`` command line. Each command lives in :mod:`moba_cli.commands`."""

from __future__ import annotations

from typing import Annotated

import typer

from moba_cli import __version__
from moba_cli.commands import bench, compare, convert
from moba_cli.commands import eval as eval_cmd

app = typer.Typer(
    name="moba",
    help=(
        "MoBA (Mixture of Block Attention) experiment toolkit: exact and fast block-sparse attention, "
        "benchmarks to 1M+ tokens, and transformers integration. Every command writes a JSON result."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"moba {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """MoBA experiment toolkit."""


app.command("compare", help=compare.HELP, short_help="Check MoBA against full attention on the same inputs.")(
    compare.compare
)
app.command("bench", help=bench.HELP, short_help="Time MoBA against dense attention (up to 1M+ tokens).")(
    bench.bench
)
app.command("convert", help=convert.HELP, short_help="Switch a transformers checkpoint's attention to MoBA.")(
    convert.convert
)

app.add_typer(eval_cmd.app, name="eval", help="Needle, RULER and loss by position: MoBA against full attention.")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
