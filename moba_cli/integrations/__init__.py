"""transformers glue: the ``moba`` attention implementation, loading, decode, convert and model compare.

The names below are the stable surface other layers (evals, train, commands) import; they load lazily so
that importing :mod:`moba_cli` (and ``moba --help``) does not import torch or transformers.

Modules, each importing only those above it (no cycles)::

    settings.py       MobaSettings (config.moba), parse_full_layers, constants; no torch
    sparsity.py       analytic pair count and expected sparsity; no torch
    masks.py          padding masks -> row spans, collator cu_seq_lens -> cu_seqlens, per-row position_ids
    decode.py         new tokens against a KV cache, cached block means
    attention.py      the registered ``moba`` attention function, its counters and cache hook, register()
    loading.py        load_model, attention_mode, moba_stats
    support.py        which architectures and configs MoBA can serve
    checkpoint.py     SRC: location, config, weight checks
    files.py          DST: independent copies, staging, --force rules, signal clean-up
    convert.py        convert_checkpoint (``moba convert``)
    model_compare.py  ``moba compare --model``: MoBA vs dense on one loaded model
    hf_hook.py        registers ``moba`` when transformers is imported (imports neither torch nor transformers)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IMPL_NAME": "moba_cli.integrations.settings",
    "CONFIG_KEY": "moba_cli.integrations.settings",
    "FULL_IMPL": "moba_cli.integrations.settings",
    "DENSE_IMPL_NAME": "moba_cli.integrations.settings",
    "MobaSettings": "moba_cli.integrations.settings",
    "parse_full_layers": "moba_cli.integrations.settings",
    "register": "moba_cli.integrations.attention",
    "load_model": "moba_cli.integrations.loading",
    "install_hooks": "moba_cli.integrations.loading",
    "attention_mode": "moba_cli.integrations.loading",
    "moba_stats": "moba_cli.integrations.loading",
    "reset_moba_stats": "moba_cli.integrations.loading",
    "convert_checkpoint": "moba_cli.integrations.convert",
    "expected_sparsity": "moba_cli.integrations.sparsity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
