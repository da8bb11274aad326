"""Reading and checking a checkpoint before conversion: where it is, its config, its weight files.

The weight check reads headers only (safetensors) or memory-maps the archive (``.bin``), so a 70B
checkpoint is checked in seconds; it catches files that do not parse and a config that does not describe
the weights (vocabulary, width, layer count, query and key/value heads).
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

from moba_cli.errors import MobaError
from moba_cli.integrations.settings import first_line
from moba_cli.integrations.support import SUPPORTED_MODEL_TYPES, check_attention_interface, head_dim_of

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


def resolve_source(src: str) -> Path:
    """A local checkpoint directory, or a hub id downloaded to the local cache (where the network allows)."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MobaError(f"SRC {src} is a file; give the checkpoint's directory")
        return path
    if _HUB_ID.match(src) and not src.startswith((".", "~")):
        return download_from_hub(src)
    raise MobaError(f"SRC {src} does not exist (give a local checkpoint directory or a hub id like org/name)")


def download_from_hub(repo_id: str) -> Path:
    """Fetch a hub checkpoint's config, tokenizer and safetensors weights into the local hub cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MobaError(f"SRC {repo_id} is not a local directory and huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - network, auth and missing-repo errors all mean "cannot fetch"
        raise MobaError(
            f"SRC {repo_id} is not a local directory and could not be fetched from the hub: {first_line(e)}"
        ) from None


def read_raw_config(src: Path) -> dict[str, Any]:
    cfg = src / "config.json"
    if not cfg.is_file():
        raise MobaError(f"SRC {src} has no config.json; it is not a transformers checkpoint")
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MobaError(f"SRC {cfg} is not valid JSON: {first_line(e)}") from None
    if not isinstance(raw, dict):
        raise MobaError(f"SRC {cfg} does not hold a JSON object")
    return raw


def load_config(src: Path, raw: dict[str, Any]):
    """The transformers config object, after the architecture is known to be supported."""
    model_type = raw.get("model_type")
    if not model_type:
        raise MobaError(f"SRC {src}/config.json has no model_type; cannot tell the architecture")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise MobaError(
            f"unsupported architecture {model_type!r}: MoBA conversion supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    archs = raw.get("architectures") or []
    if archs and not any(str(a).endswith("ForCausalLM") for a in archs):
        raise MobaError(f"SRC is a {', '.join(archs)} checkpoint; MoBA conversion needs a causal LM (*ForCausalLM)")
    try:
        from transformers import AutoConfig
    except ImportError:
        raise MobaError("moba convert needs transformers: pip install 'moba-cli[hf]'") from None
    check_attention_interface(model_type)
    try:
        return AutoConfig.from_pretrained(src)
    except Exception as e:  # noqa: BLE001 - a config transformers cannot read is a broken SRC
        raise MobaError(f"SRC {src}/config.json cannot be read by transformers: {first_line(e)}") from None


def check_weights(src: Path, config: Any) -> list[str]:
    """The checkpoint's weight files (relative names); checks they exist, parse and match the config."""
    st_index = src / "model.safetensors.index.json"
    bin_index = src / "pytorch_model.bin.index.json"
    st_files = sorted(p.name for p in src.glob("*.safetensors"))
    bin_files = sorted(p.name for p in src.glob("pytorch_model*.bin"))
    for index in (st_index, bin_index):
        if index.is_file():
            _check_index(src, index)
    if st_files:
        shapes = _safetensors_shapes(src, st_files)
        names = st_files + ([st_index.name] if st_index.is_file() else [])
    elif bin_files:
        shapes = {}
        for name in bin_files:
            shapes.update(_bin_shapes(src / name))
        names = bin_files + ([bin_index.name] if bin_index.is_file() else [])
    else:
        raise MobaError(f"SRC {src} has no weights (*.safetensors or pytorch_model*.bin)")
    _check_shapes(shapes, config)
    return names


def _check_index(src: Path, index: Path) -> None:
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise MobaError(f"SRC {index.name} is broken: {first_line(e)}") from None
    missing = sorted(s for s in shards if not (src / s).is_file())
    if missing:
        raise MobaError(f"SRC lacks weight shards named in {index.name}: {', '.join(missing[:3])}")


def _safetensors_shapes(src: Path, names: list[str]) -> dict[str, list[int]]:
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for name in names:
        try:
            with safe_open(str(src / name), framework="pt") as f:
                for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    shapes[k] = list(f.get_slice(k).get_shape())
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise MobaError(f"SRC weight file {name} is broken: {first_line(e)}") from None
    return shapes


def _bin_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes of a ``torch.save`` checkpoint; a file that does not load is broken.

    The zip format (every torch since 1.6) is memory-mapped, so nothing is read but the index; the legacy
    format has to be read whole. ``weights_only`` keeps a hostile pickle from running code.
    """
    import torch

    try:
        mmap = zipfile.is_zipfile(path)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a damaged file
        raise MobaError(f"SRC weight file {path.name} is broken: {first_line(e)}") from None
    if not isinstance(state, dict):
        raise MobaError(f"SRC weight file {path.name} is broken: it holds a {type(state).__name__}, not tensors")
    return {k: list(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _check_shapes(shapes: dict[str, list[int]], config: Any) -> None:
    """Catch a config that does not describe these weights (cheap: shapes only)."""

    def mismatch(name: str, what: str) -> MobaError:
        return MobaError(f"SRC weights do not match its config: {name} is {shapes[name]}, {what}")

    emb = [k for k in shapes if k.endswith("embed_tokens.weight")]
    if emb:
        want = [config.vocab_size, config.hidden_size]
        if shapes[emb[0]] != want:
            raise mismatch(emb[0], f"config says {want}")
    layer_ids = {int(m.group(1)) for k in shapes if (m := re.search(r"\.layers\.(\d+)\.", k))}
    if layer_ids and max(layer_ids) + 1 != config.num_hidden_layers:
        raise MobaError(
            f"SRC weights hold {max(layer_ids) + 1} layers but its config says num_hidden_layers="
            f"{config.num_hidden_layers}"
        )
    d = head_dim_of(config)
    hq = config.num_attention_heads
    hkv = getattr(config, "num_key_value_heads", None) or hq
    rows = {"q_proj": hq * d, "k_proj": hkv * d, "v_proj": hkv * d, "qkv_proj": (hq + 2 * hkv) * d}
    for name, shape in shapes.items():
        m = re.search(r"\.(q_proj|k_proj|v_proj|qkv_proj)\.weight$", name)
        # Quantised checkpoints pack their weights in other shapes: only plain [rows, hidden] is read.
        if m is None or len(shape) != 2 or shape[1] != config.hidden_size or shape[0] == rows[m.group(1)]:
            continue
        heads = f"num_key_value_heads={hkv}" if m.group(1) in ("k_proj", "v_proj") else f"num_attention_heads={hq}"
        if m.group(1) == "qkv_proj":
            heads = f"num_attention_heads={hq}, num_key_value_heads={hkv}"
        raise mismatch(name, f"config says {rows[m.group(1)]} rows ({heads}, head dim {d})")
