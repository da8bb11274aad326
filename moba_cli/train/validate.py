"""Impossible recipe combinations, found before any work starts (one MobaError each)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moba_cli.errors import MobaError
from moba_cli.train.config import Recipe, get_dotted

ATTN_KINDS = ("moba", "full")
BACKENDS = ("auto", "triton", "naive")
FULL_IMPLS = ("sdpa", "moba_dense", "flash_attention_2", "flex_attention", "eager")


def _positive(name: str, value: int | float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise MobaError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {value}")


def switch_step(recipe: Recipe) -> int | None:
    """The first step (0-based) trained with ``attention.switch_to``, or None without a switch."""
    at = recipe.attention.switch_at
    if recipe.attention.switch_to is None or at is None:
        return None
    return int(round(at * recipe.train.steps)) if at < 1 else int(at)


def kinds_used(recipe: Recipe) -> list[str]:
    kinds = [recipe.attention.kind]
    if recipe.attention.switch_to is not None:
        kinds.append(recipe.attention.switch_to)
    return kinds


def validate(recipe: Recipe, *, world_size: int | None = None, check_data: bool = True,
             cuda_count: int | None = None) -> None:
    """Raise :class:`MobaError` on the first impossible setting.

    ``world_size``: processes of this run (None: ``distributed.gpus``). ``cuda_count``: GPUs of the node
    (None: ask torch). ``check_data``: also look at the files the recipe names (``data.path``: its manifest and
    SFT mask; ``model.init_from``: its dimensions); without it the dimensions come from ``model``.
    """
    from moba_cli.train.model import MOBA_HEAD_DIMS, model_dims, resolve_dims

    a, t, d, o = recipe.attention, recipe.train, recipe.data, recipe.optim
    for name, value in (("train.steps", t.steps), ("train.batch_size", t.batch_size), ("data.seq_len", d.seq_len),
                        ("attention.chunk", a.chunk), ("attention.topk", a.topk), ("optim.lr", o.lr),
                        ("distributed.gpus", recipe.distributed.gpus), ("eval.batches", recipe.eval.batches),
                        ("eval.buckets", recipe.eval.buckets), ("log.every", recipe.log.every)):
        _positive(name, value)
    for name, value in (("train.micro_batch", t.micro_batch), ("optim.warmup_steps", o.warmup_steps),
                        ("optim.grad_clip", o.grad_clip), ("optim.weight_decay", o.weight_decay),
                        ("eval.every", recipe.eval.every), ("checkpoint.every", recipe.checkpoint.every),
                        ("checkpoint.keep", recipe.checkpoint.keep), ("eval.copy_rows", recipe.eval.copy_rows)):
        _positive(name, value, allow_zero=True)
    if not 0 <= o.min_lr_ratio <= 1:
        raise MobaError(f"optim.min_lr_ratio must be between 0 and 1, got {o.min_lr_ratio}")
    if o.warmup_steps >= t.steps and o.warmup_steps:
        raise MobaError(f"optim.warmup_steps ({o.warmup_steps}) must be fewer than train.steps ({t.steps})")
    if a.kind not in ATTN_KINDS:
        raise MobaError(f"attention.kind must be moba or full, got {a.kind!r}")
    if a.backend not in BACKENDS:
        raise MobaError(f"attention.backend must be auto, triton or naive, got {a.backend!r}")
    if a.full_impl not in FULL_IMPLS:
        raise MobaError(f"attention.full_impl must be {', '.join(FULL_IMPLS)}, got {a.full_impl!r}")
    if a.full_impl == "flash_attention_2" and "full" in kinds_used(recipe):
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise MobaError("attention.full_impl is flash_attention_2 but the flash-attn package is not installed")
    _check_switch(recipe)
    if t.device not in ("auto", "cpu", "cuda"):
        raise MobaError(f"train.device must be auto, cpu or cuda, got {t.device!r}")
    if t.dtype not in ("auto", "bf16", "fp32"):
        raise MobaError(f"train.dtype must be auto, bf16 or fp32, got {t.dtype!r}")
    if recipe.distributed.strategy not in ("ddp", "fsdp"):
        raise MobaError(f"distributed.strategy must be ddp or fsdp, got {recipe.distributed.strategy!r}")
    if recipe.distributed.backend not in ("auto", "nccl", "gloo"):
        raise MobaError(f"distributed.backend must be auto, nccl or gloo, got {recipe.distributed.backend!r}")

    if recipe.model.init_from and check_data:
        cfg = _read_config(recipe.model.init_from)
        from types import SimpleNamespace

        dims = model_dims(SimpleNamespace(**cfg))
    else:
        dims = resolve_dims(recipe.model)
    from moba_cli.train.model import moba_settings

    try:
        moba_settings(a, dims.layers)
    except MobaError as e:
        raise MobaError(f"attention.full_layers: {e}") from None
    if "moba" in kinds_used(recipe):
        if dims.head_dim not in MOBA_HEAD_DIMS and a.backend != "naive":
            raise MobaError(f"MoBA kernels take head dim 32, 64 or 128; model.hidden / model.heads is "
                            f"{dims.head_dim}")
        if d.seq_len % a.chunk:
            raise MobaError(f"attention.chunk ({a.chunk}) must divide data.seq_len ({d.seq_len}) so every row "
                            "ends on a complete MoBA block")
        if a.topk > d.seq_len // a.chunk:
            raise MobaError(f"attention.topk ({a.topk}) exceeds the {d.seq_len // a.chunk} blocks of a row "
                            f"(data.seq_len / attention.chunk)")

    _check_gpus(recipe, cuda_count)
    world = world_size if world_size is not None else recipe.distributed.gpus
    micro = t.micro_batch or t.batch_size // world
    if t.batch_size % world or micro < 1 or (t.batch_size // world) % micro:
        raise MobaError(f"train.batch_size ({t.batch_size}) must split evenly over {world} process(es) and "
                        f"micro-batches of train.micro_batch ({t.micro_batch or 'auto'}) rows")
    from moba_cli.train.data import PACKINGS
    from moba_cli.train.data_config import config_from_dict

    if d.pack not in PACKINGS:
        raise MobaError(f"data.pack must be {' or '.join(PACKINGS)}, got {d.pack!r}")
    if d.build:
        config_from_dict(d.build, "data.build")  # the same checks `moba data build` makes
    for key in recipe.sweep:
        for part in key.split(","):
            try:
                get_dotted(recipe, part.strip())
            except AttributeError:
                raise MobaError(f"sweep key {part.strip()!r} is not a recipe field") from None
        if not isinstance(recipe.sweep[key], list) or not recipe.sweep[key]:
            raise MobaError(f"sweep.{key} must be a non-empty list of values")
    if check_data:
        check_data_dir(recipe)


def _check_switch(recipe: Recipe) -> None:
    a = recipe.attention
    if (a.switch_to is None) != (a.switch_at is None):
        raise MobaError("attention.switch_to and attention.switch_at go together (e.g. switch_to: full, "
                        "switch_at: 0.9)")
    if a.switch_to is None:
        return
    if a.switch_to not in ATTN_KINDS or a.switch_to == a.kind:
        raise MobaError(f"attention.switch_to must be the other kind than attention.kind ({a.kind}), "
                        f"got {a.switch_to!r}")
    at = a.switch_at
    if at is None or at <= 0 or (at >= 1 and not float(at).is_integer()):
        raise MobaError(f"attention.switch_at must be a fraction in (0, 1) or a whole step, got {at}")
    step = switch_step(recipe)
    if step is None or not 0 < step < recipe.train.steps:
        raise MobaError(f"attention.switch_at ({at}) must fall inside the {recipe.train.steps} training steps")


def _check_gpus(recipe: Recipe, cuda_count: int | None) -> None:
    gpus = recipe.distributed.gpus
    device = recipe.train.device
    if device == "cpu":
        return
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cuda" and cuda_count == 0:
        raise MobaError("train.device is cuda but this machine has no CUDA GPU")
    if gpus > 1 and gpus > cuda_count:
        raise MobaError(f"distributed.gpus is {gpus} but this node has {cuda_count} GPU(s)")


def _read_config(path: str) -> dict[str, Any]:
    from moba_cli.train.checkpoint import resolve

    try:
        cfg = resolve(path) / "config.json"
    except MobaError as e:
        raise MobaError(f"model.init_from: {e}") from None
    try:
        return {k: v for k, v in json.loads(cfg.read_text()).items()
                if k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                         "intermediate_size")}
    except (OSError, ValueError) as e:
        raise MobaError(f"cannot read {cfg}: {e}") from None


def check_data_dir(recipe: Recipe) -> dict[str, Any]:
    """The data folder's manifest, after checking it has what the recipe needs."""
    if not recipe.data.path:
        raise MobaError("data.path is empty: point it at a folder built by `moba data build`")
    root = Path(recipe.data.path)
    manifest = root / "manifest.json"
    if not manifest.is_file():
        raise MobaError(f"data.path {root} has no manifest.json; build it with `moba data build`")
    try:
        info = json.loads(manifest.read_text())
    except ValueError as e:
        raise MobaError(f"{manifest} is not valid JSON: {e}") from None
    if info.get("schema") != "moba-data/1":
        raise MobaError(f"{manifest} is not a moba-data/1 dataset manifest")
    if recipe.data.sft and not (root / "train.mask").is_file():
        raise MobaError(f"data.sft is true but {root} has no train.mask (build SFT data with its answer mask)")
    return info
