"""The ``moba`` attention implementation transformers calls, and its registration.

After ``import moba_cli`` (which registers ``moba`` with transformers' ``AttentionInterface`` as soon as
transformers is imported, see :mod:`moba_cli.integrations.hf_hook`), a checkpoint written by
``moba convert`` loads with MoBA attention via :func:`moba_cli.load_model` or plain
``AutoModelForCausalLM.from_pretrained(dst)``.

How one attention call is served (``query [B, Hq, q, D]``, ``key``/``value [B, Hkv, L, D]`` as transformers
passes them, ``L`` counting cached tokens):

* prefill (``q == L``): :func:`moba_cli.moba_attention` (or :func:`moba_cli.full_attention` on full layers)
  on ``[B, S, H, D]`` views; a padding mask (left or right) becomes a variable-length batch with
  ``cu_seqlens`` (:mod:`moba_cli.integrations.masks`), and ``position_ids`` are passed on, so rows packing
  several sequences are split where their positions restart (without a graph break under ``torch.compile``).
* decode (``q < L``, a KV cache): :mod:`moba_cli.integrations.decode`.

Limits: transformers' default dynamic KV cache only (static/preallocated caches are refused with an
error); beam search works but rebuilds the block means every step (the cache is reordered); no attention
dropout; ``output_attentions`` gives None. On transformers 4.x, ``from_pretrained`` ignores the
``attn_implementation`` stored in config.json: pass ``attn_implementation="moba"`` or use
``load_model``. Left-padded ``forward`` calls need ``position_ids`` that skip the padding (as
``generate`` builds them).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from moba_cli.errors import MobaError
from moba_cli.integrations.decode import check_decode_cache, decode_attention
from moba_cli.integrations.masks import Spans, given_cu_seqlens, padding_mask, row_positions, row_spans
from moba_cli.integrations.settings import CONFIG_KEY, DENSE_IMPL_NAME, IMPL_NAME, MobaSettings

_registered = False


def _layer_is_full(module: Any, settings: MobaSettings) -> bool:
    idx = getattr(module, "layer_idx", None)
    if idx is None:
        raise MobaError(
            f"{type(module).__name__} has no layer_idx; MoBA needs it to pick MoBA or full attention per layer"
        )
    return idx in settings.full_layers


_UNCOUNTED = {"prefill_moba": 0, "prefill_full": 0, "decode_moba": 0, "decode_full": 0, "means_computed": 0,
              "means_updated": 0}


def layer_stats(module: Any) -> dict[str, int]:
    """The attention module's call counters of eager calls (created on first use); read by ``moba_stats``."""
    st = module.__dict__.get("_moba_stats")
    if st is None:
        st = _UNCOUNTED.copy()
        module.__dict__["_moba_stats"] = st
    return st


def _capture_cache_keys(module: Any, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: what kind of cache this call uses, and did it only grow since the last step?

    Before the cache update, the layer's cached key tensor must be the very tensor the decode state saw
    after last step's update; then the block means are updated incrementally. Anything else (a new cache,
    a beam reorder, a crop) makes them rebuilt once. Compared here because the update frees that tensor.
    Preallocated (static) caches hand the attention padded key buffers; they are flagged to be refused.
    """
    if torch.compiler.is_compiling():  # a traced forward reads no note (see moba_attention_forward)
        return
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


def ensure_hook(module: Any) -> None:
    """Put the cache pre-hook (:func:`_capture_cache_keys`) on ``module`` once (not while torch.compile traces:
    a hook handle cannot be traced, and load_model has put the hooks on before)."""
    if torch.compiler.is_compiling():
        return
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
    *,
    all_full: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``moba`` attention implementation transformers calls (``all_full``: every layer full, the
    ``moba_dense`` implementation, :data:`dense_attention_forward`).

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
    full = all_full or _layer_is_full(module, settings)
    # The counters and the cache pre-hook's note are Python bookkeeping on the module's __dict__, which
    # torch.compile cannot trace on every torch version (2.11 breaks the graph at __dict__.pop): a traced
    # call neither counts nor reads the note (None: as if the pre-hook had not run).
    traced = torch.compiler.is_compiling()
    stats = _UNCOUNTED.copy() if traced else layer_stats(module)
    ensure_hook(module)
    cache_info = None if traced else module.__dict__.pop("_moba_cache_info", None)
    b, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    if q_len > kv_len:
        raise MobaError(f"MoBA attention got {q_len} queries but only {kv_len} keys")
    spans = row_spans(attention_mask, b, kv_len)
    if q_len == kv_len:
        stats["prefill_full" if full else "prefill_moba"] += 1
        out = _prefill(query, key, value, spans, settings, full, scaling, kwargs)
    else:
        check_decode_cache(cache_info, spans, kv_len, kwargs.get("position_ids"))
        stats["decode_full" if full else "decode_moba"] += 1
        continues = bool(cache_info and cache_info["continues"])
        out = decode_attention(module, query, key, value, spans, settings, full, scaling, stats, continues)
    return out, None


dense_attention_forward = functools.partial(moba_attention_forward, all_full=True)
"""The ``moba_dense`` implementation: every layer through :func:`moba_cli.full_attention`."""


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
        cu = given_cu_seqlens(kwargs, b, s, q.device)
        if cu is None:  # rows packing several sequences are split by their positions, inside the op call
            pos = row_positions(kwargs.get("position_ids"), s)
            return fn(q, k, v, position_ids=pos, softmax_scale=scaling, **extra)
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


def register() -> None:
    """Register ``moba`` with transformers' attention (and mask) interfaces. Idempotent."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(IMPL_NAME, moba_attention_forward)
    AttentionInterface.register(DENSE_IMPL_NAME, dense_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers < 4.53 builds 4-D masks itself; row_spans reads those too
        pass
    else:
        AttentionMaskInterface.register(IMPL_NAME, padding_mask)
        AttentionMaskInterface.register(DENSE_IMPL_NAME, padding_mask)
    _keep_implementation_on_save()
    _registered = True


def _keep_implementation_on_save() -> None:
    """Make a MoBA model's saved config.json say ``"attn_implementation": "moba"``.

    transformers drops the implementation when it serialises a config (it is a load-time choice), so a
    converted model saved again with ``save_pretrained`` would load back dense. Only configs that carry
    MoBA settings and run ``moba`` gain the key; every other config serialises as before.
    """
    from transformers import PretrainedConfig

    original = PretrainedConfig.to_dict
    if getattr(original, "_moba_keeps_impl", False):
        return

    def to_dict(self: Any) -> dict[str, Any]:
        d = original(self)
        if isinstance(d.get(CONFIG_KEY), dict) and getattr(self, "_attn_implementation", None) == IMPL_NAME:
            d["attn_implementation"] = IMPL_NAME
        return d

    to_dict._moba_keeps_impl = True  # type: ignore[attr-defined]
    to_dict.__doc__ = original.__doc__
    PretrainedConfig.to_dict = to_dict
