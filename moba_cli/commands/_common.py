"""What every command shares: one-line errors with exit code 1, option parsing helpers, the console."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console

from moba_cli.errors import MobaError
from moba_cli.utils.devices import parse_dtype, resolve_device  # noqa: F401 - re-exported for commands

console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr and return the Exit to raise (code 1)."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can cause into one line and exit code 1, never a traceback."""
    try:
        yield
    except MobaError as e:
        raise fail(str(e)) from None
    except FileNotFoundError as e:
        raise fail(f"file not found: {e.filename or e}") from None
    except OSError as e:  # a folder that is a file, a read-only disk, no space left: the user's to fix
        where = f" {e.filename}" if e.filename else ""
        raise fail(f"cannot access{where}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - only the known user-facing kinds below get one line
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise fail("the GPU ran out of memory; try a shorter --seq or fewer --heads") from None
        raise
