"""Loading a converted checkpoint, switching a loaded model between MoBA and dense attention, counters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from moba_cli.errors import MobaError
from moba_cli.integrations.attention import ensure_hook, layer_stats, register
from moba_cli.integrations.settings import (
    CONFIG_KEY,
    FULL_IMPL,
    IMPL_NAME,
    SCHEMA_VERSION,
    MobaSettings,
    first_line,
    parse_full_layers,
)
from moba_cli.integrations.support import check_attention_interface


def load_model(
    path: str | Path,
    attn: str = "moba",
    *,
    chunk_size: int | None = None,
    topk: int | None = None,
    full_layers: str | Sequence[int] | None = None,
    backend: str | None = None,
    **kwargs: Any,
):
    """Load a causal LM from ``path`` with MoBA (``attn="moba"``) or dense attention (``attn="full"``).

    ``path``: a directory written by ``moba convert`` (any local transformers checkpoint works when
    ``chunk_size`` and ``topk`` are given). ``chunk_size``/``topk``/``full_layers``/``backend`` override
    the stored MoBA settings for this load only. ``attn`` may also name any transformers implementation
    (``"sdpa"``, ``"eager"``, ...); ``"full"`` means ``"sdpa"``. Other keyword arguments go to
    ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    register()
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise MobaError(f"{path} is not a model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - any unreadable config is the user's input problem
        raise MobaError(f"cannot read the config in {path}: {first_line(e)}") from None
    overrides = {"chunk_size": chunk_size, "topk": topk, "full_layers": full_layers, "backend": backend}
    if attn == "moba":
        raw = dict(getattr(config, CONFIG_KEY, None) or {})
        if not raw and (chunk_size is None or topk is None):
            raise MobaError(
                f"{path} has no MoBA settings in its config.json; convert it with `moba convert` first "
                "(or, from Python, pass chunk_size= and topk= to load_model)"
            )
        raw.setdefault("version", SCHEMA_VERSION)
        for name, value in overrides.items():
            if value is not None:
                raw[name] = (
                    parse_full_layers(value, config.num_hidden_layers) if name == "full_layers" else value
                )
        setattr(config, CONFIG_KEY, raw)
        MobaSettings.from_config(config)  # fail early on bad overrides
        check_attention_interface(config.model_type)
        impl = IMPL_NAME
    else:
        if any(v is not None for v in overrides.values()):
            raise MobaError("chunk_size/topk/full_layers/backend only apply with attn='moba'")
        impl = FULL_IMPL if attn == "full" else attn
    model = AutoModelForCausalLM.from_pretrained(path, config=config, attn_implementation=impl, **kwargs)
    install_hooks(model)
    return model


def install_hooks(model: Any) -> None:
    """Put the cache pre-hook on every attention module now (otherwise each gets it on its first call)."""
    for m in model.modules():
        if getattr(m, "layer_idx", None) is not None and type(m).__name__.endswith("Attention"):
            ensure_hook(m)


@contextlib.contextmanager
def attention_mode(model: Any, attn: str) -> Iterator[None]:
    """Run ``model`` with ``attn`` (``"moba"``, ``"full"`` or a transformers name) inside the block.

    Modules read ``config._attn_implementation`` at every call, so one set of weights serves both.
    """
    register()
    impl = IMPL_NAME if attn == "moba" else (FULL_IMPL if attn == "full" else attn)
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    configs.setdefault(id(model.config), model.config)
    old = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = impl
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = old[k]


def moba_stats(model: Any) -> list[dict[str, Any]]:
    """Per-layer counters of the ``moba`` attention calls: which path served each layer.

    One dict per attention module with ``layer``, ``kind`` (``"moba"``/``"full"`` from the config) and
    counts: ``prefill_moba``, ``prefill_full``, ``decode_moba``, ``decode_full``, ``means_computed``
    (block means built from all cached keys: once per cache and group of rows that share their left
    padding) and ``means_updated`` (incremental updates, once per completed block).
    """
    try:
        settings = MobaSettings.from_config(model.config)
        full = set(settings.full_layers)
    except MobaError:
        full = set()
    rows = []
    for m in model.modules():
        idx = getattr(m, "layer_idx", None)
        if idx is None or not hasattr(m, "config") or not type(m).__name__.endswith("Attention"):
            continue
        row = {"layer": idx, "kind": "full" if idx in full else "moba"}
        row.update(layer_stats(m))
        rows.append(row)
    return sorted(rows, key=lambda r: r["layer"])


def reset_moba_stats(model: Any) -> None:
    """Zero the counters :func:`moba_stats` reports."""
    for m in model.modules():
        m.__dict__.pop("_moba_stats", None)
