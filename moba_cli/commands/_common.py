"""What every command shares: one-line errors with exit code 1, option parsing helpers, the console."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console

from moba_cli.errors import MobaError

console = Console()
err_console = Console(stderr=True)

DTYPES = ("bfloat16", "float16", "float32")
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr and return the Exit to raise (code 1)."""
    from rich.markup import escape

    # escape: a message may hold brackets (pip extras, paths) that rich would read as markup and drop
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
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


def parse_dtype(name: str):
    import torch

    key = _DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in DTYPES:
        raise MobaError(f"unknown dtype {name!r}; choose bfloat16 (bf16), float16 (fp16) or float32 (fp32)")
    return getattr(torch, key)


def resolve_device(name: str):
    """``auto`` is cuda when available, else cpu. Asking for cuda without a GPU is an error."""
    import torch

    name = name.lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MobaError("no CUDA GPU is available on this machine; use --device cpu for a small run")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise MobaError(f"unknown device {name!r}; use auto, cpu or cuda")
