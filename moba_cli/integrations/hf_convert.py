"""``moba convert``: turn a transformers checkpoint into a MoBA checkpoint.

The weights are not touched: every file of the source is hard-linked (or copied where linking fails)
into the destination, and ``config.json`` gains the MoBA settings (schema in
:mod:`moba_cli.integrations.hf`). The destination is built in a temporary sibling directory and renamed
at the end, so a failed conversion leaves nothing behind.

What MoBA can serve is checked here, with the reason named when it cannot: only architectures whose
attention is plain causal softmax attention through transformers' ``AttentionInterface`` (listed in
:data:`SUPPORTED_MODEL_TYPES`); no soft-capping; no bidirectional attention; head dims the kernels
support. Sliding windows: a window that never bites inside the model's context
(``sliding_window >= max_position_embeddings``) is dropped from the config (recorded under
``moba.dropped``), since it is plain causal attention there; a real window is an error, because MoBA
would let tokens see keys that the trained model never saw.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from moba_cli.errors import MobaError
from moba_cli.integrations.hf import CONFIG_KEY, IMPL_NAME, MobaSettings, _first_line, parse_full_layers
from moba_cli.ops.moba.pairs import sparsity
from moba_cli.ops.moba.validate import TRITON_HEAD_DIMS

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3")
SPARSITY_LENGTHS = (32 * 1024, 128 * 1024, 1024 * 1024)
RESULT_NAME = "moba_convert.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


# --------------------------------------------------------------------------------------------- sparsity


def expected_sparsity(seq_len: int, chunk_size: int, topk: int) -> float:
    """Fraction of the causal (query, key) pairs a MoBA layer skips at ``seq_len`` tokens."""
    return sparsity(seq_len, chunk_size, topk)


# --------------------------------------------------------------------------------------------- source


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
            f"SRC {repo_id} is not a local directory and could not be fetched from the hub: {_first_line(e)}"
        ) from None


def read_raw_config(src: Path) -> dict[str, Any]:
    cfg = src / "config.json"
    if not cfg.is_file():
        raise MobaError(f"SRC {src} has no config.json; it is not a transformers checkpoint")
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MobaError(f"SRC {cfg} is not valid JSON: {_first_line(e)}") from None
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
        raise MobaError(f"SRC {src}/config.json cannot be read by transformers: {_first_line(e)}") from None


def check_attention_interface(model_type: str) -> None:
    """MoBA plugs into transformers' ``AttentionInterface``; some releases' code for an architecture
    predates it (e.g. qwen2_moe in transformers 4.x) and cannot be served."""
    import importlib

    import transformers

    try:
        mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError as e:
        raise MobaError(f"transformers cannot load the {model_type} model code: {_first_line(e)}") from None
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


def check_weights(src: Path, config: Any) -> list[str]:
    """The checkpoint's weight files (relative names); checks they exist, parse and match the config."""
    index = src / "model.safetensors.index.json"
    st_files = sorted(p.name for p in src.glob("*.safetensors"))
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise MobaError(f"SRC {index.name} is broken: {_first_line(e)}") from None
        missing = sorted(s for s in shards if not (src / s).is_file())
        if missing:
            raise MobaError(f"SRC lacks weight shards named in {index.name}: {', '.join(missing[:3])}")
    if not st_files:
        bins = sorted(p.name for p in src.glob("pytorch_model*.bin"))
        if bins:
            return bins + ([n.name for n in src.glob("pytorch_model.bin.index.json")])
        raise MobaError(f"SRC {src} has no weights (*.safetensors or pytorch_model*.bin)")
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for name in st_files:
        try:
            with safe_open(str(src / name), framework="pt") as f:
                for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    shapes[k] = list(f.get_slice(k).get_shape())
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise MobaError(f"SRC weight file {name} is broken: {_first_line(e)}") from None
    _check_shapes(shapes, config)
    return st_files + ([index.name] if index.is_file() else [])


def _check_shapes(shapes: dict[str, list[int]], config: Any) -> None:
    """Catch a config that does not describe these weights (cheap: headers only)."""
    emb = [k for k in shapes if k.endswith("embed_tokens.weight")]
    if emb:
        want = [config.vocab_size, config.hidden_size]
        if shapes[emb[0]] != want:
            raise MobaError(
                f"SRC weights do not match its config: {emb[0]} is {shapes[emb[0]]}, config says {want}"
            )
    layer_ids = {int(m.group(1)) for k in shapes if (m := re.search(r"\.layers\.(\d+)\.", k))}
    if layer_ids and max(layer_ids) + 1 != config.num_hidden_layers:
        raise MobaError(
            f"SRC weights hold {max(layer_ids) + 1} layers but its config says num_hidden_layers="
            f"{config.num_hidden_layers}"
        )


# --------------------------------------------------------------------------------------------- convert


def _populate(src: Path, dst: Path) -> tuple[int, int]:
    """Hard-link (else copy) every file of ``src`` except config.json into ``dst``. Returns (linked, copied)."""
    linked = copied = 0
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            if name.startswith(".") or (rel == Path(".") and name in ("config.json", RESULT_NAME)):
                continue
            s, d = Path(root) / name, dst / rel / name
            try:
                os.link(s, d)  # follows symlinks (hub cache snapshots link to blobs)
                linked += 1
            except OSError:
                shutil.copy2(s, d)
                copied += 1
    return linked, copied


def model_summary(config: Any, settings: MobaSettings) -> dict[str, Any]:
    n = config.num_hidden_layers
    full = list(settings.full_layers)
    return {
        "model_type": config.model_type,
        "num_layers": n,
        "moba_layers": [i for i in range(n) if i not in full],
        "full_layers": full,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "head_dim": head_dim_of(config),
        "chunk_size": settings.chunk_size,
        "topk": settings.topk,
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
    }


def sparsity_records(settings: MobaSettings, num_layers: int) -> list[dict[str, Any]]:
    """Expected sparsity at 32K, 128K and 1M tokens, per MoBA layer and over all layers."""
    n_moba = num_layers - len(settings.full_layers)
    rows = []
    for n in SPARSITY_LENGTHS:
        s = expected_sparsity(n, settings.chunk_size, settings.topk)
        rows.append({
            "seq_len": n,
            "blocks": -(-n // settings.chunk_size),
            "sparsity_moba_layer": s,
            "sparsity_model": s * n_moba / num_layers,
        })
    return rows


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    chunk_size: int = 4096,
    topk: int = 12,
    full_layers: str | list[int] | None = "last:3",
    force: bool = False,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Write a MoBA checkpoint to ``dst``; returns the ``convert`` result (also saved as ``dst/moba_convert.json``
    and to ``out`` when given)."""
    from moba_cli.results import check_out, make_result, write_result

    for name, value in (("--chunk", chunk_size), ("--topk", topk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MobaError(f"{name} must be a positive integer, got {value!r}")
    dst = Path(dst).expanduser()
    if dst.exists() and not force:
        raise MobaError(f"DST {dst} already exists (use --force to replace it)")
    src_path = resolve_source(str(src))
    s_abs, d_abs = src_path.resolve(), dst.resolve()
    if s_abs == d_abs or s_abs in d_abs.parents or d_abs in s_abs.parents:
        raise MobaError("SRC and DST must be separate directories (neither inside the other)")
    raw = read_raw_config(src_path)
    config = load_config(src_path, raw)
    edits = check_servable(config)
    weights = check_weights(src_path, config)
    full = parse_full_layers(full_layers, config.num_hidden_layers)
    settings = MobaSettings(chunk_size=chunk_size, topk=topk, full_layers=tuple(full))

    moba_cfg = settings.to_config()
    if edits:
        moba_cfg["dropped"] = {k: raw.get(k) for k in edits if k in raw}
    new_raw = {**raw, **edits, "attn_implementation": IMPL_NAME, CONFIG_KEY: moba_cfg}
    summary = model_summary(config, settings)
    records = sparsity_records(settings, config.num_hidden_layers)
    run_config = {
        "src": str(src), "src_path": str(src_path), "dst": str(dst), "chunk_size": chunk_size, "topk": topk,
        "full_layers": full_layers if isinstance(full_layers, str) or full_layers is None else list(full_layers),
        "force": force,
    }

    if out is not None:
        check_out(out, out)  # before DST is built, so a bad --out leaves nothing behind
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".moba-tmp", dir=dst.parent))
    except OSError as e:  # DST's folder is a file, read-only, or not ours
        blocker = next((a for a in dst.parents if a.exists() and not a.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker is not None else (e.strerror or str(e))
        raise MobaError(f"cannot create DST {dst}: {reason}") from None
    out_file: Path | None = None
    try:
        linked, copied = _populate(src_path, tmp)
        (tmp / "config.json").write_text(json.dumps(new_raw, indent=2, sort_keys=True) + "\n")
        summary.update({"dst": str(dst), "weights": weights, "files_linked": linked, "files_copied": copied,
                        "config_edits": edits})
        result = make_result("convert", run_config, records, summary)
        write_result(result, tmp / RESULT_NAME, default_dir=tmp)
        if out is not None:
            out_file = write_result(result, out, default_dir=out)
        _swap_into_place(tmp, dst, force)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if out_file is not None:
            out_file.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise MobaError(f"cannot write {dst}: {e.strerror or e}") from None
        raise
    result["summary"]["result_file"] = str(dst / RESULT_NAME)
    if out_file is not None:
        result["summary"]["out_file"] = str(out_file)
    return result


def _swap_into_place(tmp: Path, dst: Path, force: bool) -> None:
    if not (dst.exists() or dst.is_symlink()):
        tmp.rename(dst)
        return
    if not force:
        raise MobaError(f"DST {dst} already exists (use --force to replace it)")
    if dst.is_dir() and not dst.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".moba-old", dir=dst.parent))
        old.rmdir()
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        dst.unlink()
        tmp.rename(dst)
