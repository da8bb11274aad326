"""Loading the model under evaluation once, with its tokenizer, for MoBA, full attention or both.

One set of weights serves both kinds: :func:`moba_cli.integrations.attention_mode` switches between them,
so MoBA and full attention are compared on the same weights and prompts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moba_cli.errors import MobaError

ATTN_CHOICES = ("moba", "full", "both")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def parse_attn(attn: str) -> list[str]:
    """``"both"`` -> ``["moba", "full"]``; ``"moba"``/``"full"`` -> themselves."""
    a = attn.strip().lower()
    if a not in ATTN_CHOICES:
        raise MobaError(f"--attn {attn!r}: choose moba, full or both")
    return ["moba", "full"] if a == "both" else [a]


def set_offline() -> None:
    """Every evaluation runs offline: the hub is never asked, a missing file is an error instead."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[name] = "1"


@dataclass
class LoadedModel:
    """A causal LM and its tokenizer; ``has_moba`` when the MoBA attention can be switched on."""

    model: Any
    tokenizer: Any
    path: Path
    device: torch.device
    dtype: torch.dtype
    has_moba: bool
    max_positions: int | None
    moba: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])


def check_model_dir(path: Path | str) -> Path:
    """Fail fast (before torch is busy) on a missing model directory or one without a tokenizer."""
    p = Path(path)
    if not p.is_dir():
        raise MobaError(f"--model {p} is not a directory")
    if not (p / "config.json").is_file():
        raise MobaError(f"--model {p} is not a model directory (no config.json)")
    if not any((p / n).is_file() for n in _TOKENIZER_FILES):
        raise MobaError(f"--model {p} has no tokenizer (tokenizer.json or tokenizer.model); evals need one")
    return p


def load(
    path: Path | str,
    attns: list[str],
    *,
    device: torch.device,
    dtype: torch.dtype,
    chunk_size: int | None = None,
    topk: int | None = None,
) -> LoadedModel:
    """Load ``path`` once for every attention in ``attns`` (MoBA settings from its config or overrides)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from moba_cli.integrations import MobaSettings, load_model

    p = check_model_dir(path)
    set_offline()
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(p)
    except Exception as e:  # noqa: BLE001 - any unreadable tokenizer is the user's input problem
        raise MobaError(f"cannot load the tokenizer in {p}: {str(e).strip().splitlines()[0]}") from None
    wants_moba = "moba" in attns
    if not wants_moba and (chunk_size is not None or topk is not None):
        raise MobaError("--chunk/--topk only apply with --attn moba or both")
    if wants_moba and (chunk_size is None or topk is None) and not _has_moba_config(p):
        raise MobaError(f"{p} has no MoBA settings (not a moba convert/train output): pass both --chunk and --topk, "
                        "or --attn full")
    model = load_model(p, "moba" if wants_moba else "full", chunk_size=chunk_size, topk=topk, dtype=dtype)
    model.to(device).eval()
    moba = None
    if wants_moba:
        s = MobaSettings.from_config(model.config)
        moba = {"chunk_size": s.chunk_size, "topk": s.topk, "full_layers": list(s.full_layers), "backend": s.backend}
    max_pos = getattr(model.config, "max_position_embeddings", None)
    return LoadedModel(model, tok, p, device, dtype, wants_moba, max_pos, moba)


def _has_moba_config(path: Path) -> bool:
    import json

    try:
        return isinstance(json.loads((path / "config.json").read_text()).get("moba"), dict)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def attention(lm: LoadedModel, attn: str) -> Iterator[None]:
    """Run ``lm.model`` with ``attn`` (``moba`` or ``full``) inside the block."""
    from moba_cli.integrations import attention_mode

    if attn == "moba" and not lm.has_moba:
        raise MobaError("internal: MoBA asked of a model loaded for full attention only")
    with attention_mode(lm.model, attn):
        yield


def moba_calls(lm: LoadedModel) -> int:
    """How many MoBA (not full-layer) attention calls ran since the last reset: proof MoBA served them."""
    from moba_cli.integrations import moba_stats

    return sum(r["prefill_moba"] + r["decode_moba"] for r in moba_stats(lm.model))


def reset_calls(lm: LoadedModel) -> None:
    from moba_cli.integrations import reset_moba_stats

    reset_moba_stats(lm.model)


def length_notes(lm: LoadedModel, lengths: list[int]) -> list[str]:
    """A warning for each length beyond the model's trained positions (the run goes on)."""
    if not lm.max_positions:
        return []
    over = [n for n in lengths if n > lm.max_positions]
    if not over:
        return []
    return [
        f"lengths {', '.join(map(str, over))} exceed the model's max_position_embeddings "
        f"({lm.max_positions}): results there measure extrapolation too"
    ]


def is_oom(e: BaseException) -> bool:
    """A CUDA (or CPU allocator) out-of-memory error: recorded for the cell, the run goes on."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before any text (a BOS token, for most), ``[]`` for none."""
    with_sp = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for i in range(len(with_sp) - len(without) + 1):
        if with_sp[i : i + len(without)] == without:
            return with_sp[:i]
    return []
