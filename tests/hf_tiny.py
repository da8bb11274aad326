"""Small randomly initialised transformers checkpoints for tests and GPU scripts (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "phi3")


def tiny_config(
    model_type: str = "llama",
    *,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 2,
    kv_heads: int = 1,
    intermediate: int = 128,
    vocab: int = 128,
    max_positions: int = 512,
    init_range: float = 0.1,
    **overrides: Any,
):
    """A transformers config of ``model_type`` (one of :data:`TINY_TYPES`) with head dim ``hidden // heads``.

    ``init_range`` is larger than the usual 0.02 so random weights give clearly distinct attention
    patterns (and MoBA gate scores) in tests. ``overrides`` go to the config class as they are.
    """
    import transformers as tf

    common: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": max_positions,
        "initializer_range": init_range,
        "tie_word_embeddings": False,
    }
    extra: dict[str, dict[str, Any]] = {
        "llama": {},
        "mistral": {"sliding_window": None, "head_dim": hidden // heads},
        "qwen2": {},
        "qwen3": {"head_dim": hidden // heads},
        "mixtral": {"sliding_window": None, "num_local_experts": 2, "num_experts_per_tok": 1},
        "qwen2_moe": {"num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": intermediate,
                      "shared_expert_intermediate_size": intermediate},
        "qwen3_moe": {"num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": intermediate,
                      "head_dim": hidden // heads},
        "phi3": {"pad_token_id": 0},
    }
    classes = {
        "llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
        "mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig",
        "phi3": "Phi3Config",
    }
    if model_type not in classes:
        raise ValueError(f"unknown tiny model type {model_type!r}; choose from {', '.join(TINY_TYPES)}")
    cls = getattr(tf, classes[model_type])
    return cls(**{**common, **extra[model_type], **overrides})


def random_model(config, seed: int = 0, dtype: torch.dtype | None = None):
    """A causal LM built from ``config`` with seeded random weights (on the CPU)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype) if dtype else AutoModelForCausalLM.from_config(
        config
    )
    return model.eval()


def save_random_checkpoint(path: str | Path, config, seed: int = 0) -> Path:
    """Write a randomly initialised checkpoint of ``config`` (safetensors) to ``path``."""
    path = Path(path)
    random_model(config, seed).save_pretrained(path)
    return path
