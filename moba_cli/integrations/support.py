"""Which transformers models MoBA can serve, with the reason named when it cannot.

Only architectures whose attention is plain causal softmax attention through transformers'
``AttentionInterface`` (:data:`SUPPORTED_MODEL_TYPES`); no soft-capping; no bidirectional attention; head
dims the kernels support; query heads a multiple of key/value heads. Sliding windows: a window that never
bites inside the model's context (``sliding_window >= max_position_embeddings``) is plain causal attention
there and is dropped from the config; a real window is an error, because MoBA would let tokens see keys
that the trained model never saw.
"""

from __future__ import annotations

from typing import Any

from moba_cli.errors import MobaError
from moba_cli.integrations.settings import first_line
from moba_cli.ops.moba.validate import TRITON_HEAD_DIMS

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3")


def check_attention_interface(model_type: str) -> None:
    """MoBA plugs into transformers' ``AttentionInterface``; some releases' code for an architecture
    predates it (e.g. qwen2_moe in transformers 4.x) and cannot be served."""
    import importlib

    import transformers

    try:
        mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError as e:
        raise MobaError(f"transformers cannot load the {model_type} model code: {first_line(e)}") from None
    if not hasattr(mod, "ALL_ATTENTION_FUNCTIONS"):
        raise MobaError(
            f"transformers {transformers.__version__}'s {model_type} code does not dispatch attention through "
            "AttentionInterface, so MoBA cannot plug in; upgrade transformers"
        )


def head_dim_of(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def check_servable(config: Any) -> dict[str, Any]:
    """Raise :class:`MobaError` naming why MoBA cannot serve ``config``; else return config edits to apply.

    The edits only remove sliding windows that never bite within ``max_position_embeddings``.
    """
    if getattr(config, "is_causal", True) is False or getattr(config, "use_bidirectional_attention", False):
        raise MobaError("the model's attention is not causal (bidirectional); MoBA is causal attention")
    for name in ("attn_logit_softcapping", "attention_logit_softcapping"):
        if getattr(config, name, None):
            raise MobaError(f"the model soft-caps attention logits ({name}={getattr(config, name)}); MoBA cannot")
    d = head_dim_of(config)
    if d not in TRITON_HEAD_DIMS:
        raise MobaError(
            f"unsupported head dim {d}: the MoBA kernels support {', '.join(map(str, TRITON_HEAD_DIMS))}"
        )
    hq, hkv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if hq % hkv:
        raise MobaError(f"{hq} query heads are not a multiple of {hkv} key/value heads")
    context = getattr(config, "max_position_embeddings", None)
    window = getattr(config, "sliding_window", None) or None
    layer_types = getattr(config, "layer_types", None)
    edits: dict[str, Any] = {}
    if layer_types:
        other = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
        if other:
            raise MobaError(f"layers of type {', '.join(other)} cannot run MoBA (only full or sliding attention)")
        sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
        if sliding:
            _check_window(window, context, f"layers {_ranges(sliding)} use sliding-window attention")
            edits["layer_types"] = ["full_attention"] * len(layer_types)
            edits["sliding_window"] = None
            if hasattr(config, "use_sliding_window"):
                edits["use_sliding_window"] = False
    elif window is not None and getattr(config, "use_sliding_window", True):
        _check_window(window, context, "the model uses sliding-window attention")
        edits["sliding_window"] = None
        if hasattr(config, "use_sliding_window"):
            edits["use_sliding_window"] = False
    return edits


def _check_window(window: int | None, context: int | None, what: str) -> None:
    if window is None or (context is not None and window >= context):
        return  # never narrower than the context: plain causal attention
    raise MobaError(
        f"{what} (sliding_window={window}, smaller than the {context}-token context); MoBA cannot serve "
        "sliding windows"
    )


def _ranges(idx: list[int]) -> str:
    return f"{idx[0]}..{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) and len(idx) > 2 else ",".join(
        map(str, idx)
    )
