"""transformers glue: the ``moba`` attention implementation, loading, decode, convert and model compare.

The names below are the stable surface other layers (evals, train, commands) import; they load lazily so
that importing :mod:`moba_cli` (and ``moba --help``) does not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IMPL_NAME": "moba_cli.integrations.hf",
    "CONFIG_KEY": "moba_cli.integrations.hf",
    "FULL_IMPL": "moba_cli.integrations.hf",
    "MobaSettings": "moba_cli.integrations.hf",
    "parse_full_layers": "moba_cli.integrations.hf",
    "register": "moba_cli.integrations.hf",
    "load_model": "moba_cli.integrations.hf",
    "install_hooks": "moba_cli.integrations.hf",
    "attention_mode": "moba_cli.integrations.hf",
    "moba_stats": "moba_cli.integrations.hf",
    "reset_moba_stats": "moba_cli.integrations.hf",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
