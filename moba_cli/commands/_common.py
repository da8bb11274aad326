"""What every command shares: the console, the option types that recur, and one place that turns errors into
one ``error:`` line.

Commands raise :class:`~moba_cli.errors.MobaError` for bad input; :func:`user_errors` (wrapped around every
command by the ``moba`` group in :mod:`moba_cli.cli`) prints it once as ``error: ...`` and exits with code 1.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from moba_cli.errors import MobaError
from moba_cli.utils.devices import DTYPES, parse_dtype, resolve_device
from moba_cli.utils.limits import SEED_MAX

__all__ = [
    "DTYPES", "SEED_MAX", "DeviceOpt", "DtypeOpt", "OutOpt", "SeedOpt", "console", "err_console", "fail",
    "group", "parse_dtype", "print_error", "resolve_device", "user_errors",
]

console = Console()
err_console = Console(stderr=True)

EXIT_INTERRUPTED = 130  # the shell's code for SIGINT

# Option types shared by the commands. Help texts say what the option does in every command; a command with a
# different default says so in its own HELP.
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out", metavar="DIR|FILE.json", show_default=False,
        help="Where the result JSON goes: a folder (each run adds a new file, never overwriting one) or a .json "
             "file name.",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda when available), cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="bfloat16 (bf16), float16 (fp16) or float32 (fp32).")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Seed of the random inputs.")]


def print_error(message: str) -> None:
    """``error: message`` on stderr, on one line (rich markup in ``message`` is not interpreted)."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` and return the Exit to raise."""
    print_error(message)
    return typer.Exit(code=code)


def group(help: str, name: str | None = None) -> typer.Typer:
    """A command group (``moba eval``, ``moba data``) with the settings of the ``moba`` app: ``-h``, no
    shell completion, help when called without a subcommand, errors formatted by :func:`user_errors`."""
    return typer.Typer(
        name=name, help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can cause into one ``error:`` line and a non-zero exit, never a traceback.

    MobaError -> code 1; Ctrl-C -> code 130; a missing file, an unwritable folder or a full disk (OSError)
    and CUDA out-of-memory -> code 1. Anything else is a bug and keeps its traceback.
    """
    try:
        yield
    except MobaError as e:
        raise fail(str(e)) from None
    except KeyboardInterrupt:
        raise fail("interrupted", code=EXIT_INTERRUPTED) from None
    except FileNotFoundError as e:
        raise fail(f"file not found: {e.filename or e}") from None
    except OSError as e:  # a folder that is a file, a read-only disk, no space left: the user's to fix
        where = f" {e.filename}" if e.filename else ""
        raise fail(f"cannot access{where}: {e.strerror or e}") from None
    except Exception as e:
        torch = sys.modules.get("torch")  # never import torch just to look at an error
        if torch is not None and isinstance(e, torch.cuda.OutOfMemoryError):
            raise fail("the GPU ran out of memory; try a shorter --seq or fewer --heads") from None
        raise
