"""The ``moba`` command line: a Typer app whose commands load lazily.

Each command lives in :mod:`moba_cli.commands` and is imported only when it runs or shows its own help, so
``moba --help`` never imports torch. To add a command, add one line to :data:`COMMANDS`:

* one command: ``"train": Lazy("moba_cli.commands.train:train", "Train ...")`` - a Typer-style function; its
  help is the module's ``HELP`` string if it has one, else the function's docstring;
* a group of subcommands: ``"eval": Lazy("moba_cli.commands.eval:app", "Evaluate ...")`` - a ``typer.Typer``
  whose commands become ``moba eval <sub>`` (always a group, even with one subcommand).

The short help is written here so that listing the commands imports none of them. Every command runs inside
:func:`moba_cli.commands._common.user_errors`: a MobaError is printed once as ``error: ...`` (exit 1), Ctrl-C
gives exit 130, and a bad option value is one ``error:`` line too (exit 2).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from moba_cli import __version__
from moba_cli.commands._common import fail, user_errors
from moba_cli.errors import MobaError


@dataclass(frozen=True)
class Lazy:
    """A command known by name before it is imported: ``target`` is ``"module:attribute"``."""

    target: str
    short_help: str


COMMANDS: dict[str, Lazy] = {
    "compare": Lazy("moba_cli.commands.compare:compare", "Check MoBA against full attention on the same inputs."),
    "bench": Lazy("moba_cli.commands.bench:bench", "Time MoBA against dense attention (up to 1M+ tokens)."),
    "convert": Lazy("moba_cli.commands.convert:convert", "Switch a transformers checkpoint's attention to MoBA."),
    "data": Lazy("moba_cli.commands.data:app", "Build training datasets offline (tokenizer, token files, manifest)."),
    "train": Lazy("moba_cli.commands.train:train", "Train a MoBA or full-attention model from a YAML recipe."),
    "sweep": Lazy("moba_cli.commands.sweep:sweep", "Run a grid of training runs and fit loss against compute."),
    "eval": Lazy("moba_cli.commands.eval:app", "Needle, RULER and loss by position: MoBA against full attention."),
}

# click's UsageError (bad option value, unknown option or command); typer vendors click, so it is reached
# through typer's public BadParameter rather than imported from a private module.
_USAGE_ERROR: type[Exception] = typer.BadParameter.__mro__[1]


class _FlagsWithoutType:
    """Typer (0.2x, which vendors click) prints an option's annotation as its type, so a flag shows ``<bool>``
    in --help although it takes no value (click printed none). An empty metavar leaves the column blank."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params


class MobaCommand(_FlagsWithoutType, TyperCommand):
    """A ``moba`` command (flags without ``<bool>``)."""


class MobaSubGroup(_FlagsWithoutType, TyperGroup):
    """A ``moba`` sub-app such as ``moba eval`` (flags without ``<bool>``)."""


class MobaGroup(_FlagsWithoutType, TyperGroup):
    """The root group: lists :data:`COMMANDS` without importing them; loads one when it runs."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._listing = False
        # Stand-ins carrying only the short help: enough for the command list and for "did you mean".
        for name, lazy in COMMANDS.items():
            self.commands.setdefault(name, MobaCommand(name=name, short_help=lazy.short_help))
        self._loaded: dict[str, Any] = {}

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if self._listing or cmd_name not in COMMANDS:
            return super().get_command(ctx, cmd_name)
        if cmd_name not in self._loaded:
            self._loaded[cmd_name] = load_command(cmd_name, COMMANDS[cmd_name])
        return self._loaded[cmd_name]

    def invoke(self, ctx: Any) -> Any:
        try:
            with user_errors():
                return super().invoke(ctx)
        except _USAGE_ERROR as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # `moba eval` alone: typer prints the help
                raise
            where = getattr(e, "ctx", None)
            hint = ""
            if where is not None:  # the usage line names the arguments, e.g. "moba convert [OPTIONS] SRC DST"
                usage = " ".join(where.get_usage().split()).removeprefix("Usage: ")
                hint = f" (usage: {usage}; see {where.command_path} --help)"
            raise fail(e.format_message().rstrip(".") + hint, code=e.exit_code) from None


def load_command(name: str, lazy: Lazy) -> Any:
    """Import ``lazy.target`` and build its click command (a group for a ``typer.Typer``)."""
    module_name, _, attr = lazy.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:  # an optional dependency of that command (transformers, lm-eval, ...)
        missing = (e.name or "").partition(".")[0]
        if not missing or missing == module_name.partition(".")[0]:
            raise
        raise MobaError(f"'moba {name}' needs the Python package {missing!r}, which is not installed") from None
    obj = getattr(module, attr)
    if isinstance(obj, typer.Typer):
        _use_moba_classes(obj)
        group = typer.main.get_group(obj)
        group.name = name
        group.short_help = group.short_help or lazy.short_help
        group.help = group.help or lazy.short_help
        return group
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command(name, cls=MobaCommand, help=getattr(module, "HELP", None), short_help=lazy.short_help)(obj)
    return typer.main.get_command(single)


def _use_moba_classes(sub: typer.Typer) -> None:
    """Give a sub-app's groups and commands the classes above, unless it chose its own."""
    # typer fills in its own classes (or a placeholder) when none was given; only those are replaced
    if not isinstance(sub.info.cls, type) or sub.info.cls is TyperGroup:
        sub.info.cls = MobaSubGroup
    for info in sub.registered_commands:
        if info.cls is None or info.cls is TyperCommand:
            info.cls = MobaCommand
    for group in sub.registered_groups:
        if group.typer_instance is not None:
            _use_moba_classes(group.typer_instance)


app = typer.Typer(
    name="moba",
    cls=MobaGroup,
    help=(
        "MoBA (Mixture of Block Attention) experiment toolkit: exact and fast block-sparse attention, "
        "benchmarks to 1M+ tokens, and transformers integration. Every command writes a JSON result.\n\n"
        "Examples: moba compare --seq 4k; moba bench --preset paper; moba convert ./Llama ./Llama-moba. "
        "Run moba COMMAND --help for a command's options."
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
