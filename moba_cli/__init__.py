"""moba: a command-line experiment toolkit for MoBA (Mixture of Block Attention, arXiv 2502.13189).

The public names load on first use, so ``import moba_cli`` (and ``moba --help``) stays free of torch and
transformers; only the transformers hook is installed at import (it imports neither).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from moba_cli.errors import MobaError
from moba_cli.integrations.hf_hook import install_transformers_hook as _install_transformers_hook

__version__ = "0.1.0"

# public name -> module that defines it; each module is imported only when its name is first read
_LAZY = {
    "moba_attention": "moba_cli.ops.moba",
    "full_attention": "moba_cli.ops.moba",
    "moba_decode": "moba_cli.ops.moba.decode",
    "load_model": "moba_cli.integrations",  # the integrations' stable (lazy) surface
}

__all__ = ["MobaError", "__version__", "full_attention", "load_model", "moba_attention", "moba_decode"]

if TYPE_CHECKING:  # static tools see the real signatures
    from moba_cli.integrations import load_model
    from moba_cli.ops.moba import full_attention, moba_attention
    from moba_cli.ops.moba.decode import moba_decode


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# `moba` becomes a transformers attention implementation once transformers loads (never imported here).
_install_transformers_hook()
