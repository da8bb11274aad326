"""Training recipes: typed sections with a help text per field, read from YAML, overridden with ``--set``.

A recipe file mirrors :class:`Recipe`::

    name: smoke
    model: {size: tiny}
    attention: {kind: moba, chunk: 32, topk: 2}
    data: {path: data/smoke, seq_len: 128}
    train: {steps: 20, batch_size: 8}
    sweep: {model.size: [tiny, 20M], attention.kind: [moba, full]}   # only for `moba sweep`

Every field's meaning is its ``help`` metadata (``moba train --explain`` prints them). Unknown keys, wrong
types and impossible combinations are :class:`~moba_cli.errors.MobaError` before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moba_cli.errors import MobaError


def opt(default: Any, help: str, *, tokens: bool = False) -> Any:
    """A recipe field: ``help`` documents it; ``tokens`` lets it be written as a size like ``8k``."""
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "tokens": tokens})
    return field(default=default, metadata={"help": help, "tokens": tokens})


@dataclass
class ModelSection:
    """The network: a Llama-architecture causal LM."""

    size: str = opt("tiny", "Named size from moba_cli.train.model.SIZES (tiny, 3M ... 400M: non-embedding "
                            "parameters), or 'custom' with every dimension below given.")
    layers: int | None = opt(None, "Transformer blocks (overrides the size's).")
    hidden: int | None = opt(None, "Model width (overrides the size's).")
    heads: int | None = opt(None, "Query heads; hidden / heads is the head dimension (32, 64 or 128 for MoBA).")
    kv_heads: int | None = opt(None, "Key/value heads (GQA/MQA); must divide heads. Default: heads.")
    intermediate: int | None = opt(None, "MLP width (overrides the size's).")
    rope_theta: float = opt(10000.0, "RoPE base; raise it for long contexts (e.g. 500000 at 32K).")
    init_from: str | None = opt(None, "Start from this checkpoint directory (continued pre-training) instead "
                                      "of random weights; its dimensions win over size/layers/...")


@dataclass
class AttentionSection:
    """Which attention each layer runs, and when it changes."""

    kind: str = opt("moba", "moba or full (transformers' SDPA).")
    chunk: int = opt(512, "MoBA block size in tokens; must divide data.seq_len.", tokens=True)
    topk: int = opt(3, "Blocks each query attends, its own block included.")
    full_layers: str = opt("none", "Layers kept on full attention under kind=moba: last:3, first:2, 0,5 or none "
                                   "(the paper's layer-wise hybrid).")
    backend: str = opt("auto", "MoBA kernel: auto (Triton on CUDA), triton or naive (float32 reference).")
    full_impl: str = opt("sdpa", "transformers attention for kind=full: sdpa (a packed block-diagonal mask), "
                                 "moba_dense (this project's full_attention: SDPA with cuDNN first, one call per "
                                 "packed sequence, no mask tensor), flash_attention_2 (variable-length kernel; "
                                 "needs flash-attn) or flex_attention.")
    switch_to: str | None = opt(None, "Attention kind after switch_at (e.g. full for the paper's 90/10 recipe).")
    switch_at: float | None = opt(None, "When to switch: a fraction of train.steps in (0, 1) or a step >= 1.")


@dataclass
class DataSection:
    """The data built by `moba data build`."""

    path: str = opt("", "Folder written by `moba data build` (tokens, tokenizer, manifest.json).")
    seq_len: int = opt(1024, "Tokens per training row (documents packed, attention masked per document).",
                       tokens=True)
    pack: str = opt("documents", "Packing mode passed to the loader (documents: rows cut at document ends).")
    sft: bool = opt(False, "Require the SFT loss mask (train.mask): loss only on answer tokens.")
    build: dict[str, Any] = opt({}, "How `moba data build --config RECIPE` makes data.path (its DataConfig keys: "
                                    "sources, vocab_size, max_tokens, ...); moba train only reads data.path.")


@dataclass
class OptimSection:
    """AdamW with linear warm-up and cosine decay."""

    lr: float = opt(3e-4, "Peak learning rate.")
    min_lr_ratio: float = opt(0.1, "Final learning rate as a fraction of lr.")
    warmup_steps: int = opt(0, "Linear warm-up steps.")
    weight_decay: float = opt(0.1, "AdamW weight decay (not applied to norms and biases).")
    beta1: float = opt(0.9, "AdamW beta1.")
    beta2: float = opt(0.95, "AdamW beta2.")
    eps: float = opt(1e-8, "AdamW epsilon.")
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this (0: no clipping).")
    fused: bool = opt(True, "Fused AdamW kernel where the device has one (CUDA).")


@dataclass
class TrainSection:
    """Steps, batch and numerics."""

    steps: int = opt(100, "Optimizer steps.")
    batch_size: int = opt(8, "Global batch in rows per step, whatever the GPU count.")
    micro_batch: int = opt(0, "Rows per forward on one device (0: the whole per-device share); the rest is "
                              "gradient accumulation.")
    seed: int = opt(0, "Seed of weights, data order and everything random.")
    device: str = opt("auto", "auto (cuda when present), cuda or cpu.")
    dtype: str = opt("auto", "Autocast dtype: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32.")
    compile: bool = opt(False, "torch.compile the model.")
    activation_checkpointing: bool = opt(False, "Recompute activations in the backward pass (less memory).")


@dataclass
class EvalSection:
    """Validation during training."""

    every: int = opt(0, "Validate every N steps (0: only at the end).")
    batches: int = opt(2, "Validation batches (of train.batch_size rows) per evaluation.")
    buckets: int = opt(8, "Position buckets for the loss-by-position (trailing-token) curve.")
    copy_rows: int = opt(4, "Rows of the copy probe (random ids, a passage written twice at a random "
                            "distance): val_copy_loss_second falling below val_copy_loss_first shows copying "
                            "(induction heads) forming. 0: off.")


@dataclass
class CheckpointSection:
    """Checkpoints: Hugging Face directories plus the training state."""

    every: int = opt(0, "Save every N steps (0: only at the end).")
    keep: int = opt(2, "Keep the newest N step-N/ folders (0: keep all).")
    final: bool = opt(True, "Save at the last step (off for throughput measurements that need no model).")


@dataclass
class LogSection:
    """Metrics and the run folder."""

    every: int = opt(1, "Write a metrics line every N steps.")
    out: str = opt("runs/{name}", "Run folder; {name} is replaced by the recipe name.")
    progress: bool = opt(True, "Show a progress bar.")


@dataclass
class DistributedSection:
    """Several GPUs of one node, through torchrun."""

    gpus: int = opt(1, "GPUs (processes); >1 launches torchrun. Must not exceed the GPUs of the node.")
    strategy: str = opt("ddp", "ddp (replicated weights) or fsdp (FSDP2 fully_shard, for models that do not "
                               "fit one GPU).")
    backend: str = opt("auto", "Process-group backend: auto (nccl on CUDA, gloo on CPU), nccl or gloo.")


@dataclass
class Recipe:
    """A whole training recipe."""

    name: str = opt("run", "Run name (used in the run folder and results).")
    description: str = opt("", "What the recipe reproduces.")
    model: ModelSection = field(default_factory=ModelSection)
    attention: AttentionSection = field(default_factory=AttentionSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    sweep: dict[str, list] = opt({}, "Grid for `moba sweep`: dotted field -> list of values; 'a.b,c.d' -> list of "
                                     "[a.b value, c.d value] pairs for fields that change together.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.log.out.replace("{name}", self.name))


SECTIONS = {f.name: f.type for f in dataclasses.fields(Recipe)}


# --------------------------------------------------------------------------------------------- reading


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def coerce(value: Any, tp: Any, key: str, *, tokens: bool = False) -> Any:
    """``value`` as type ``tp`` (strings from ``--set`` converted), else a MobaError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key, tokens=tokens)
            except MobaError as e:
                errors.append(e)
        raise errors[0]
    if origin is dict:
        if not isinstance(value, dict):
            raise MobaError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            if tokens:
                from moba_cli.utils.sizes import parse_size

                try:
                    return parse_size(value)
                except MobaError:
                    pass
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-3 (no dot) as a string
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    raise MobaError(f"{key} must be {_type_name(tp)}, got {value!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise MobaError(f"{prefix.rstrip('.') or 'the recipe'} must be a mapping of keys to values, got {raw!r}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise MobaError(f"unknown recipe key {path!r}; known keys here: {', '.join(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{path}.")
        else:
            kwargs[key] = coerce(value, tp, path, tokens=fields[key].metadata.get("tokens", False))
    return cls(**kwargs)


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    """A :class:`Recipe` from nested dicts (YAML), type-checked; unknown keys are errors."""
    return _build(Recipe, raw, "")


def parse_set(items: list[str] | None) -> list[tuple[str, Any]]:
    """``["train.steps=10", "attention.kind=full"]`` -> ``[(key, value)]`` with YAML-typed values."""
    import yaml

    out = []
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise MobaError(f"--set {item!r}: write key.sub=value, e.g. --set train.steps=100")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        out.append((key.strip(), value))
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set dotted keys in a copy of the nested dict ``raw`` (types are checked later, by the dataclasses)."""
    import copy

    raw = copy.deepcopy(raw)
    for key, value in overrides:
        parts = key.split(".")
        node = raw
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise MobaError(f"--set {key}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MobaError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise MobaError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise MobaError(f"recipe {path} must be a YAML mapping (sections like model:, train:)")
    return raw


def load_recipe(path: str | Path, sets: list[str] | None = None) -> Recipe:
    """Read, override and type-check a recipe (see :func:`moba_cli.train.validate.validate` for the rest)."""
    raw = apply_overrides(read_yaml(path), parse_set(sets))
    raw.setdefault("name", Path(path).stem)
    return recipe_from_dict(raw)


def field_help(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, Any]]:
    """Every leaf field as ``(dotted key, help, default)``, for ``--explain`` and the docs."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(field_help(tp, f"{prefix}{f.name}."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{prefix}{f.name}", f.metadata.get("help", ""), default))
    return rows


def get_dotted(recipe: Recipe, key: str) -> Any:
    obj: Any = recipe
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj
