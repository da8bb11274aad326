"""``moba convert``: turn a transformers checkpoint into a MoBA checkpoint.

The weights are not changed. DST gets its own copy of every file of SRC (see
:mod:`moba_cli.integrations.files`: reflinks where the filesystem has them, hard links only on request)
and a ``config.json`` that adds the MoBA settings (schema in :mod:`moba_cli.integrations.settings`). What
MoBA can serve is checked first (:mod:`~moba_cli.integrations.support`,
:mod:`~moba_cli.integrations.checkpoint`); DST is built beside itself and renamed at the end, so a failure
or a signal leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moba_cli.errors import MobaError
from moba_cli.integrations.checkpoint import check_weights, load_config, read_raw_config, resolve_source
from moba_cli.integrations.files import (
    MARKER,
    check_replaceable,
    make_stage,
    move_into_place,
    populate,
    remove_stale_stages,
    signals_as_exceptions,
    source_files,
    write_marker,
)
from moba_cli.integrations.settings import CONFIG_KEY, IMPL_NAME, MobaSettings, parse_full_layers
from moba_cli.integrations.sparsity import sparsity_records
from moba_cli.integrations.support import check_servable, head_dim_of

RESULT_NAME = "moba_convert.json"


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


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    chunk_size: int = 4096,
    topk: int = 12,
    full_layers: str | Sequence[int] | None = "last:3",
    force: bool = False,
    out: str | Path | None = None,
    link: bool = False,
) -> dict[str, Any]:
    """Write a MoBA checkpoint to ``dst``; returns the ``convert`` result (also saved as
    ``dst/moba_convert.json`` and to ``out`` when given; ``out`` may lie inside ``dst``).

    ``force`` replaces a ``dst`` that an earlier conversion wrote and nobody changed since; ``link``
    hard-links the weight files instead of copying them (DST then shares them with SRC: writing into DST's
    weights changes SRC's).
    """
    from moba_cli.results import check_out, make_result, write_result

    for name, value in (("--chunk", chunk_size), ("--topk", topk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MobaError(f"{name} must be a positive integer, got {value!r}")
    dst = Path(dst).expanduser()
    check_replaceable(dst, force)
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
    files, skipped = source_files(src_path, exclude=("config.json", RESULT_NAME))

    moba_cfg = settings.to_config()
    if edits:
        moba_cfg["dropped"] = {k: raw.get(k) for k in edits if k in raw}
    new_raw = {**raw, **edits, "attn_implementation": IMPL_NAME, CONFIG_KEY: moba_cfg}
    summary = model_summary(config, settings)
    records = sparsity_records(settings, config.num_hidden_layers)
    run_config = {
        "src": str(src), "src_path": str(src_path), "dst": str(dst), "chunk_size": chunk_size, "topk": topk,
        "full_layers": full_layers if isinstance(full_layers, str) or full_layers is None else list(full_layers),
        "force": force, "link": link,
    }

    out_rel = _inside(out, d_abs)
    if out_rel is not None:
        _check_out_in_dst(out, out_rel, {str(rel) for rel, _ in files})
    elif out is not None:
        check_out(out, out)  # before DST is built, so a bad --out leaves nothing behind
    made = [a for a in reversed(dst.parents) if not a.exists()]  # folders to remove again on failure
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_stages(dst.parent)
        stage = make_stage(dst)
    except OSError as e:  # DST's folder is a file, read-only, or not ours
        _remove_empty(made)
        blocker = next((a for a in dst.parents if a.exists() and not a.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker is not None else (e.strerror or str(e))
        raise MobaError(f"cannot create DST {dst}: {reason}") from None
    out_file: Path | None = None  # a result written outside DST, to remove if the conversion fails
    final_out: Path | None = None
    with signals_as_exceptions():
        try:
            counts = populate(files, stage, link=link)
            (stage / "config.json").write_text(json.dumps(new_raw, indent=2, sort_keys=True) + "\n")
            summary.update({
                "dst": str(dst), "weights": weights, "files_cloned": counts.cloned,
                "files_copied": counts.copied, "files_linked": counts.linked, "skipped": counts.skipped + skipped,
                "config_edits": edits,
            })
            result = make_result("convert", run_config, records, summary)
            write_result(result, stage / RESULT_NAME, default_dir=stage)
            if out_rel is not None:
                in_stage = write_result(result, stage / out_rel, default_dir=stage / out_rel)
                final_out = dst / in_stage.relative_to(stage)
            elif out is not None:
                out_file = final_out = write_result(result, out, default_dir=out)
            write_marker(stage)
            move_into_place(stage, dst, force)
        except BaseException as e:
            shutil.rmtree(stage, ignore_errors=True)
            if out_file is not None:
                out_file.unlink(missing_ok=True)
            _remove_empty(made)
            if isinstance(e, OSError):
                raise MobaError(f"cannot write {dst}: {e.strerror or e}") from None
            raise
    result["summary"]["result_file"] = str(dst / RESULT_NAME)
    if final_out is not None:
        result["summary"]["out_file"] = str(final_out)
    return result


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this run created on the way to DST (deepest first), as long as they are empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def _inside(out: str | Path | None, d_abs: Path) -> Path | None:
    """``out`` relative to DST when it points into DST (``Path(".")`` for DST itself), else None."""
    if out is None:
        return None
    o_abs = Path(out).expanduser().resolve()
    if o_abs == d_abs or d_abs in o_abs.parents:
        return o_abs.relative_to(d_abs)
    return None


def _check_out_in_dst(out: str | Path, rel: Path, written: set[str]) -> None:
    """A result inside DST must not take the place of a file (or folder) the conversion writes."""
    taken = written | {"config.json", MARKER}
    parts = rel.parts
    for i in range(1, len(parts) + 1):
        prefix = str(Path(*parts[:i]))
        if prefix in taken:
            raise MobaError(f"--out {out} would take the place of DST's file {prefix}; give another name")
    if rel.suffix.lower() == ".json" and any(w.startswith(f"{rel}/") for w in taken):
        raise MobaError(f"--out {out} would take the place of DST's folder {rel}; give another name")
