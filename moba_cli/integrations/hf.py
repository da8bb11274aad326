"""MoBA inside Hugging Face transformers models: the ``moba`` attention implementation and loading.

After ``import moba_cli`` (which registers ``moba`` with transformers' ``AttentionInterface`` as soon as
transformers is imported), a checkpoint written by ``moba convert`` loads with MoBA attention either via
:func:`load_model` or plain ``AutoModelForCausalLM.from_pretrained(dst)``.

Config schema (``config.json`` of a converted checkpoint)::

    "attn_implementation": "moba",
    "moba": {"version": 1, "chunk_size": 4096, "topk": 12, "full_layers": [29, 30, 31]}

``full_layers`` lists the layers that keep dense causal attention; every other layer runs MoBA. An optional
``"backend"`` key (``auto``/``naive``/``triton``) picks the kernel; it is a runtime choice and not written by
``moba convert``.

How one attention call is served (``query [B, Hq, q, D]``, ``key``/``value [B, Hkv, L, D]`` as transformers
passes them, ``L`` counting cached tokens):

* prefill (``q == L``): :func:`moba_cli.moba_attention` (or :func:`moba_cli.full_attention` on full layers)
  on ``[B, S, H, D]`` views; a padding mask (left or right) or packed ``position_ids`` become a
  variable-length batch with ``cu_seqlens`` so blocks restart at every sequence's first real token.
* decode (``q < L``, a KV cache): see :mod:`moba_cli.integrations.hf_decode`.

Limits: transformers' default dynamic KV cache only (static/preallocated caches are refused with an
error); beam search works but rebuilds the block means every step (the cache is reordered); no attention
dropout; ``output_attentions`` gives None. On transformers 4.x, ``from_pretrained`` ignores the
``attn_implementation`` stored in config.json: pass ``attn_implementation="moba"`` or use
:func:`load_model`. Left-padded ``forward`` calls need ``position_ids`` that skip the padding (as
``generate`` builds them).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moba_cli.errors import MobaError

IMPL_NAME = "moba"
CONFIG_KEY = "moba"
SCHEMA_VERSION = 1
FULL_IMPL = "sdpa"  # what ``attn="full"`` loads: transformers' own dense attention

_registered = False


# --------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class MobaSettings:
    """The MoBA settings of one model, read from ``config.moba``."""

    chunk_size: int
    topk: int
    full_layers: tuple[int, ...] = ()
    backend: str = "auto"

    def to_config(self) -> dict[str, Any]:
        """The dict stored as ``config.moba`` (``backend`` only when it is not the default)."""
        d: dict[str, Any] = {
            "version": SCHEMA_VERSION,
            "chunk_size": self.chunk_size,
            "topk": self.topk,
            "full_layers": list(self.full_layers),
        }
        if self.backend != "auto":
            d["backend"] = self.backend
        return d

    @classmethod
    def from_config(cls, config: Any) -> MobaSettings:
        raw = getattr(config, CONFIG_KEY, None)
        if not isinstance(raw, dict):
            raise MobaError(
                "this model's config has no 'moba' settings; convert the checkpoint with `moba convert` "
                "or load it with moba_cli.load_model(path, chunk_size=..., topk=...)"
            )
        version = raw.get("version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise MobaError(f"config.moba has version {version}; this moba understands version {SCHEMA_VERSION}")
        try:
            chunk, topk = raw["chunk_size"], raw["topk"]
        except KeyError as e:
            raise MobaError(f"config.moba lacks {e.args[0]!r}") from None
        for name, value in (("chunk_size", chunk), ("topk", topk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MobaError(f"config.moba.{name} must be a positive integer, got {value!r}")
        full = raw.get("full_layers", []) or []
        if not isinstance(full, list | tuple) or not all(isinstance(i, int) for i in full):
            raise MobaError(f"config.moba.full_layers must be a list of layer indices, got {full!r}")
        backend = raw.get("backend", "auto")
        if backend not in ("auto", "naive", "triton"):
            raise MobaError(f"config.moba.backend must be auto, naive or triton, got {backend!r}")
        return cls(chunk_size=chunk, topk=topk, full_layers=tuple(sorted(set(full))), backend=backend)


def parse_full_layers(spec: str | Sequence[int] | None, num_layers: int) -> list[int]:
    """Which layers keep full attention.

    ``spec``: ``"last:3"``, ``"first:2"``, ``"none"``, ``"all"``, or explicit indices ``"0,5,31"`` (negative
    indices count from the end, ``a-b`` is an inclusive range), or a list of ints. Returns sorted indices.
    """
    if spec is None:
        return []
    if not isinstance(spec, str):
        items: list[int] = list(spec)
    else:
        s = spec.strip().lower().replace(" ", "")
        if s in ("", "none"):
            return []
        if s == "all":
            return list(range(num_layers))
        if s.startswith(("last:", "first:")):
            kind, _, n_text = s.partition(":")
            if not n_text.isdigit():
                raise MobaError(f"cannot read --full-layers {spec!r}; write e.g. last:3, first:2, 0,5,31 or none")
            n = int(n_text)
            if n > num_layers:
                raise MobaError(f"--full-layers {spec!r} asks for {n} layers but the model has {num_layers}")
            return list(range(num_layers - n, num_layers)) if kind == "last" else list(range(n))
        items = []
        for part in s.split(","):
            m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
            if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
                raise MobaError(
                    f"cannot read --full-layers {spec!r}; write e.g. last:3, first:2, 0,5,31, 4-7 or none"
                )
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            items.extend(range(lo, hi + 1))
    out = set()
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int) or not -num_layers <= i < num_layers:
            raise MobaError(
                f"full layer {i!r} is out of range: the model has {num_layers} layers (0..{num_layers - 1})"
            )
        out.add(i % num_layers)
    return sorted(out)


# --------------------------------------------------------------------------------------------- masks


def _moba_mask(*, kv_length: int, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """Mask builder registered for ``moba``: like flash-attention, keep only the 2-D padding mask.

    Returns ``attention_mask[:, -kv_length:]`` as bool, or None when nothing is padded. Causality and the
    block structure are the kernels' business. transformers passes keywords only; the other ones
    (``q_length`` or ``cache_position``, offsets, ``mask_function``, ...) differ between releases.
    """
    if attention_mask is None:
        return None
    m = attention_mask[:, -kv_length:].bool()
    if m.shape[1] == kv_length and bool(m.all()):
        return None
    return m


@dataclass
class Spans:
    """Per-row ``[start, end)`` of real tokens along the key axis (``L`` positions)."""

    starts: list[int]
    ends: list[int]
    valid: torch.Tensor | None = field(default=None, repr=False)  # [B, L] bool, when a mask was given

    @property
    def lengths(self) -> list[int]:
        return [e - s for s, e in zip(self.starts, self.ends, strict=True)]


_span_cache: dict[str, Any] = {"mask": None, "version": None, "spans": None}


def row_spans(mask: torch.Tensor | None, batch: int, length: int) -> Spans | None:
    """Real-token spans from the padding mask transformers passed; None when nothing is padded.

    ``mask``: None, a 2-D ``[B, L]`` padding mask (bool or 0/1), or a 4-D ``[B, 1, q, L]`` mask (bool, or
    additive float with large negatives) whose last query row is read as the padding mask. Every row's
    real tokens must be contiguous (left or right padding).
    """
    if mask is None:
        return None
    # All layers of one forward share the mask object: derive the spans (one host sync) once. The
    # version counter catches in-place edits of a reused mask.
    if _span_cache["mask"] is mask and _span_cache["version"] == mask._version:
        return _span_cache["spans"]
    if mask.dim() == 4:
        row = mask[:, 0, -1, :]
        valid = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    elif mask.dim() == 2:
        valid = mask.bool()
    else:
        raise MobaError(f"MoBA attention got a {mask.dim()}-D attention mask; expected a 2-D padding mask")
    if valid.shape[0] == 1 and batch > 1:  # one mask row broadcast over the batch
        valid = valid.expand(batch, -1)
    if valid.shape[0] != batch or valid.shape[1] != length:
        raise MobaError(
            f"the attention mask covers {tuple(valid.shape)} (batch, keys) but the keys are {(batch, length)}; "
            "MoBA needs the default dynamic KV cache (static/offloaded caches are not supported)"
        )
    n = valid.sum(1)
    first = valid.int().argmax(1)
    last = length - 1 - valid.flip(1).int().argmax(1)
    counts, firsts, lasts = torch.stack([n, first, last]).tolist()
    starts, ends = [], []
    for c, f, la in zip(counts, firsts, lasts, strict=True):
        if c == 0:
            starts.append(length)
            ends.append(length)
            continue
        if la - f + 1 != c:
            raise MobaError(
                "MoBA attention needs each row's real tokens to be contiguous (left or right padding); "
                "the attention mask has holes"
            )
        starts.append(f)
        ends.append(la + 1)
    spans = Spans(starts, ends, valid)
    if all(s == 0 for s in starts) and all(e == length for e in ends):
        spans = None
    _span_cache.update(mask=mask, version=mask._version, spans=spans)
    return spans


_packed_cache: dict[str, Any] = {"pos": None, "version": None, "cu": None}


def _packed_cu_seqlens(position_ids: Any, batch: int, length: int, device: torch.device) -> torch.Tensor | None:
    """cu_seqlens of sequences packed along each row, found where ``position_ids`` do not step by one.

    Returns None for the usual one sequence per row (positions ``p, p+1, ...``).
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.shape[-1] != length:
        return None
    if _packed_cache["pos"] is position_ids and _packed_cache["version"] == position_ids._version:
        return _packed_cache["cu"]  # every layer of a forward gets the same tensor
    pos = position_ids.expand(batch, length)
    breaks = pos[:, 1:] != pos[:, :-1] + 1
    cu = None
    if bool(breaks.any()):
        starts = torch.ones(batch, length, dtype=torch.bool, device=pos.device)
        starts[:, 1:] = breaks
        idx = torch.nonzero(starts.flatten()).flatten()
        cu = torch.cat([idx, torch.tensor([batch * length], device=idx.device)]).to(device=device, dtype=torch.int32)
    _packed_cache.update(pos=position_ids, version=position_ids._version, cu=cu)
    return cu


# --------------------------------------------------------------------------------------------- attention


def _layer_is_full(module: Any, settings: MobaSettings) -> bool:
    idx = getattr(module, "layer_idx", None)
    if idx is None:
        raise MobaError(
            f"{type(module).__name__} has no layer_idx; MoBA needs it to pick MoBA or full attention per layer"
        )
    return idx in settings.full_layers


def _stats(module: Any) -> dict[str, int]:
    st = module.__dict__.get("_moba_stats")
    if st is None:
        st = {
            "prefill_moba": 0, "prefill_full": 0, "decode_moba": 0, "decode_full": 0,
            "means_computed": 0, "means_updated": 0,
        }
        module.__dict__["_moba_stats"] = st
    return st


def _capture_cache_keys(module: Any, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: what kind of cache this call uses, and did it only grow since the last step?

    Before the cache update, the layer's cached key tensor must be the very tensor the decode state saw
    after last step's update; then the block means are updated incrementally. Anything else (a new cache,
    a beam reorder, a crop) makes them rebuilt once. Compared here because the update frees that tensor.
    Preallocated (static) caches hand the attention padded key buffers; they are flagged to be refused.
    """
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    idx = getattr(module, "layer_idx", None)
    keys = _cache_layer_keys(cache, idx)
    state = module.__dict__.get("_moba_decode")
    seen = state.keys_ref() if state is not None else None
    layers = getattr(cache, "layers", None)
    layer = layers[idx] if isinstance(layers, list | tuple) and idx is not None and idx < len(layers) else None
    static = bool(getattr(layer if layer is not None else cache, "is_compileable", False))
    module.__dict__["_moba_cache_info"] = {
        "continues": seen is not None and seen is keys,
        "static": type(cache).__name__ if static else None,
    }


def _cache_layer_keys(cache: Any, idx: int | None) -> torch.Tensor | None:
    if cache is None or idx is None:
        return None
    layers = getattr(cache, "layers", None)  # transformers 5.x
    if isinstance(layers, list | tuple) and idx < len(layers):
        return getattr(layers[idx], "keys", None)
    key_cache = getattr(cache, "key_cache", None)  # transformers 4.x DynamicCache
    if isinstance(key_cache, list) and idx < len(key_cache):
        return key_cache[idx]
    return None


def _ensure_hook(module: Any) -> None:
    if "_moba_hook" not in module.__dict__ and isinstance(module, torch.nn.Module):
        module.__dict__["_moba_hook"] = module.register_forward_pre_hook(_capture_cache_keys, with_kwargs=True)


def moba_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``moba`` attention implementation transformers calls.

    query ``[B, Hq, q, D]``, key/value ``[B, Hkv, L, D]`` (``L >= q``; cached tokens first).
    Returns ``(out [B, q, Hq, D], None)``; attention weights are never materialised.
    """
    if dropout:
        raise MobaError("MoBA attention has no dropout; set the model's attention_dropout to 0 to train")
    if kwargs.get("sliding_window") is not None:
        raise MobaError(
            f"this layer uses sliding-window attention (sliding_window={kwargs['sliding_window']}), "
            "which MoBA cannot serve"
        )
    if getattr(module, "is_causal", True) is False:
        raise MobaError("MoBA attention is causal; this attention module is not")
    if kwargs.get("softcap") is not None:
        raise MobaError("MoBA attention does not support attention logit soft-capping")
    settings = MobaSettings.from_config(module.config)
    full = _layer_is_full(module, settings)
    stats = _stats(module)
    _ensure_hook(module)
    cache_info = module.__dict__.pop("_moba_cache_info", None)  # None: the pre-hook did not run
    b, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    if q_len > kv_len:
        raise MobaError(f"MoBA attention got {q_len} queries but only {kv_len} keys")
    spans = row_spans(attention_mask, b, kv_len)
    if q_len == kv_len:
        stats["prefill_full" if full else "prefill_moba"] += 1
        out = _prefill(query, key, value, spans, settings, full, scaling, kwargs)
    else:
        from moba_cli.integrations.hf_decode import check_decode_cache, decode_attention

        check_decode_cache(cache_info, spans, kv_len, kwargs.get("position_ids"))
        stats["decode_full" if full else "decode_moba"] += 1
        continues = bool(cache_info and cache_info["continues"])
        out = decode_attention(module, query, key, value, spans, settings, full, scaling, stats, continues)
    return out, None


def _prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spans: Spans | None,
    settings: MobaSettings,
    full: bool,
    scaling: float | None,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """Self-attention over the ``S`` new tokens. Returns ``[B, S, Hq, D]``."""
    from moba_cli.ops.moba import full_attention, moba_attention

    if full:
        fn = full_attention
        extra: dict[str, Any] = {"backend": "naive" if settings.backend == "naive" else "auto"}
    else:
        fn = moba_attention
        extra = {"chunk_size": settings.chunk_size, "topk": settings.topk, "backend": settings.backend}
    # [B, H, S, D] -> [B, S, H, D] views; the op reads them as they are.
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    b, s = q.shape[:2]
    if spans is None:
        cu = _given_cu_seqlens(kwargs, b, s, q.device)
        if cu is None:
            cu = _packed_cu_seqlens(kwargs.get("position_ids"), b, s, q.device)
        if cu is None:
            return fn(q, k, v, softmax_scale=scaling, **extra)
        flat = [x.reshape(b * s, *x.shape[2:]) for x in (q, k, v)]
        return fn(*flat, cu_seqlens=cu, softmax_scale=scaling, **extra).view(q.shape)
    # Padding: gather the real tokens of every row into one packed batch, blocks restart per row.
    valid = spans.valid
    if valid is None:
        raise MobaError("internal: padded spans without their mask")
    lengths = torch.tensor([0, *spans.lengths], dtype=torch.int64)
    cu = torch.cumsum(lengths, 0).to(device=q.device, dtype=torch.int32)
    packed = fn(q[valid], k[valid], v[valid], cu_seqlens=cu, softmax_scale=scaling, **extra)
    out = q.new_zeros(q.shape)  # padded positions get zeros (nothing reads them)
    out[valid] = packed
    return out


def _given_cu_seqlens(kwargs: dict[str, Any], b: int, s: int, device: torch.device) -> torch.Tensor | None:
    """cu_seqlens passed by a flattening data collator (``cu_seq_lens_q``), for one packed row."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if not isinstance(cu_q, torch.Tensor):
        return None
    if isinstance(cu_k, torch.Tensor) and not torch.equal(cu_q.cpu(), cu_k.cpu()):
        raise MobaError("MoBA attention needs cu_seq_lens_q == cu_seq_lens_k (self-attention)")
    if int(cu_q[-1]) != b * s:
        raise MobaError(f"cu_seq_lens_q ends at {int(cu_q[-1])} but the batch has {b * s} tokens")
    return cu_q.to(device=device, dtype=torch.int32)


# --------------------------------------------------------------------------------------------- registration


def register() -> None:
    """Register ``moba`` with transformers' attention (and mask) interfaces. Idempotent."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(IMPL_NAME, moba_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers < 4.53 builds 4-D masks itself; row_spans reads those too
        pass
    else:
        AttentionMaskInterface.register(IMPL_NAME, _moba_mask)
    _registered = True


# --------------------------------------------------------------------------------------------- loading


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
        raise MobaError(f"cannot read the config in {path}: {_first_line(e)}") from None
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
        from moba_cli.integrations.hf_convert import check_attention_interface

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
            _ensure_hook(m)


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
        row.update(_stats(m))
        rows.append(row)
    return sorted(rows, key=lambda r: r["layer"])


def reset_moba_stats(model: Any) -> None:
    """Zero the counters :func:`moba_stats` reports."""
    for m in model.modules():
        m.__dict__.pop("_moba_stats", None)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
