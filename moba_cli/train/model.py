"""The trained network: a transformers Llama of a named size, with MoBA, full or hybrid attention.

Attention goes through the project's registration (:mod:`moba_cli.integrations`): the config carries
``config.moba`` (chunk, top-k, full layers), so a saved checkpoint is an ordinary Hugging Face directory
that ``moba_cli.load_model`` and ``from_pretrained`` load with MoBA or with full attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moba_cli.errors import MobaError

# Non-embedding parameter counts name the sizes (head dim 64 except tiny's 32; MHA by default).
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128},
    "3M": {"layers": 4, "hidden": 256, "heads": 4, "intermediate": 704},
    "5M": {"layers": 6, "hidden": 256, "heads": 4, "intermediate": 704},
    "10M": {"layers": 8, "hidden": 320, "heads": 5, "intermediate": 864},
    "20M": {"layers": 6, "hidden": 512, "heads": 8, "intermediate": 1376},
    "50M": {"layers": 10, "hidden": 640, "heads": 10, "intermediate": 1728},
    "100M": {"layers": 14, "hidden": 768, "heads": 12, "intermediate": 2048},
    "200M": {"layers": 16, "hidden": 1024, "heads": 16, "intermediate": 2816},
    "400M": {"layers": 24, "hidden": 1152, "heads": 18, "intermediate": 3072},
}

# Dense bf16 tensor-core peaks (no sparsity), for MFU. Matched against torch.cuda.get_device_name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}
MOBA_HEAD_DIMS = (32, 64, 128)


@dataclass(frozen=True)
class Dims:
    """Resolved model dimensions."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def non_embedding_params(self) -> int:
        """Weights of the blocks (attention, MLP, norms): the N of scaling laws."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp + 2 * self.hidden) + self.hidden


def resolve_dims(section: Any) -> Dims:
    """Dims from a :class:`~moba_cli.train.config.ModelSection` (named size plus explicit overrides)."""
    if section.size == "custom":
        base: dict[str, int] = {}
    elif section.size in SIZES:
        base = dict(SIZES[section.size])
    else:
        raise MobaError(f"model.size {section.size!r} is unknown; choose {', '.join(SIZES)} or custom")
    for key in ("layers", "hidden", "heads", "intermediate"):
        value = getattr(section, key)
        if value is not None:
            base[key] = value
        if key not in base:
            raise MobaError(f"model.size is custom, so model.{key} must be given")
        if base[key] < 1:
            raise MobaError(f"model.{key} must be positive, got {base[key]}")
    heads = base["heads"]
    kv = section.kv_heads if section.kv_heads is not None else heads
    if base["hidden"] % heads:
        raise MobaError(f"model.hidden ({base['hidden']}) must be a multiple of model.heads ({heads})")
    if kv < 1 or heads % kv:
        raise MobaError(f"model.kv_heads ({kv}) must divide model.heads ({heads})")
    return Dims(base["layers"], base["hidden"], heads, kv, base["intermediate"])


def moba_settings(attention: Any, layers: int, device_type: str = "cuda"):
    """The :class:`MobaSettings` of an :class:`~moba_cli.train.config.AttentionSection`.

    On the CPU ``backend: auto`` means the float32 reference: Triton there is its interpreter, meant for
    kernel tests and far slower than the reference.
    """
    from moba_cli.integrations import MobaSettings, parse_full_layers

    full = parse_full_layers(attention.full_layers, layers)
    backend = "naive" if attention.backend == "auto" and device_type == "cpu" else attention.backend
    return MobaSettings(chunk_size=attention.chunk, topk=attention.topk, full_layers=tuple(full), backend=backend)


def impl_name(kind: str, attention: Any = None) -> str:
    """The transformers attention implementation of ``kind``: ``moba``, or ``attention.full_impl`` for full."""
    from moba_cli.integrations import FULL_IMPL, IMPL_NAME

    if kind == "moba":
        return IMPL_NAME
    full = getattr(attention, "full_impl", "sdpa")
    return FULL_IMPL if full == "sdpa" else full


def build_model(recipe: Any, vocab_size: int, special: dict[str, int | None] | None = None,
                device_type: str = "cuda"):
    """A causal LM for ``recipe`` (random weights from ``train.seed``, or ``model.init_from``), in float32."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from moba_cli.integrations import CONFIG_KEY, load_model, register

    register()
    kind = recipe.attention.kind
    if recipe.model.init_from:
        from moba_cli.train.checkpoint import resolve

        model = load_model(resolve(recipe.model.init_from), attn="full", dtype=torch.float32)
        model.config.max_position_embeddings = max(model.config.max_position_embeddings, recipe.data.seq_len)
        if model.config.vocab_size < vocab_size:
            raise MobaError(f"model.init_from has a vocabulary of {model.config.vocab_size} tokens but the data "
                            f"uses {vocab_size}; build the data with the checkpoint's tokenizer")
        settings = moba_settings(recipe.attention, model.config.num_hidden_layers, device_type)
        setattr(model.config, CONFIG_KEY, settings.to_config())
        model.config._attn_implementation = impl_name(kind, recipe.attention)
        return model
    dims = resolve_dims(recipe.model)
    settings = moba_settings(recipe.attention, dims.layers, device_type)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=dims.hidden, intermediate_size=dims.intermediate,
        num_hidden_layers=dims.layers, num_attention_heads=dims.heads, num_key_value_heads=dims.kv_heads,
        max_position_embeddings=recipe.data.seq_len, rope_theta=recipe.model.rope_theta,
        tie_word_embeddings=False, attention_dropout=0.0, **(special or {}),
    )
    setattr(config, CONFIG_KEY, settings.to_config())
    torch.manual_seed(recipe.train.seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl_name(kind, recipe.attention),
                                             dtype=torch.float32)
    return model


def model_dims(config: Any) -> Dims:
    """Dims of a transformers config (for a model loaded with ``init_from``)."""
    return Dims(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                config.num_key_value_heads, config.intermediate_size)


def train_flops_per_token(dims: Dims, vocab: int, seq_len: int, attention: Any, kind: str) -> float:
    """Model FLOPs of one trained token (forward + backward = 3x forward, no recomputation counted).

    Matmuls: 6 per weight (blocks and LM head). Attention: ``3 * 4 * D`` per attended (query, key) pair
    and head, the pairs counted by :mod:`moba_cli.ops.moba.pairs` (MoBA counts only the blocks it attends;
    full-attention layers of a hybrid count causal pairs). Rows are counted as one sequence of ``seq_len``;
    document masking makes the real work smaller, which this count ignores (as is usual).
    """
    from moba_cli.bench.flops import FWD_FLOPS_PER_PAIR_PER_DIM
    from moba_cli.ops.moba.pairs import attended_pairs as moba_pairs
    from moba_cli.ops.moba.pairs import causal_pairs as dense_causal_pairs

    matmul = 6 * (dims.non_embedding_params() + dims.hidden * vocab)
    if kind == "moba":
        full = len(moba_settings(attention, dims.layers).full_layers)
        pairs = (dims.layers - full) * moba_pairs(seq_len, attention.chunk, attention.topk)
        pairs += full * dense_causal_pairs(seq_len)
    else:
        pairs = dims.layers * dense_causal_pairs(seq_len)
    attn = 3 * FWD_FLOPS_PER_PAIR_PER_DIM * dims.head_dim * dims.heads * pairs / seq_len
    return matmul + attn


def peak_flops(device: Any) -> float | None:
    """The bf16 dense peak of ``device`` (None on CPU or an unknown GPU: MFU is then not reported)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
