"""The result files every command writes: one JSON schema, so results can be compared and plotted.

Layout (``schema: "moba-result/1"``)::

    {
      "schema": "moba-result/1",
      "kind": "compare" | "bench" | "convert" | "gpu-suite" | ...,   # later: "eval-needle", "sweep", ...
      "created": "2026-11-30T01:23:45Z",
      "moba_version": "0.1.0",
      "env": {... collect_env() ...},
      "config": {... every option after presets are applied ...},
      "records": [{... one flat row per measured case, ready for a DataFrame ...}],
      "summary": {... the headline numbers ...}
    }
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

SCHEMA = "moba-result/1"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """HEAD of the source tree (with ``-dirty`` when it has uncommitted changes).

    Outside a git checkout (a copied tree on a GPU machine) it reads ``MOBA_GIT_COMMIT``; else None.
    """
    import os

    if os.environ.get("MOBA_GIT_COMMIT"):
        return os.environ["MOBA_GIT_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def collect_env() -> dict[str, Any]:
    """Versions, GPU, git commit, command line and date: what a reader needs to trust a number."""
    import torch

    env: dict[str, Any] = {
        "date": utc_now(),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": None,
        "gpu_count": 0,
        "driver": None,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        env["gpu_memory_bytes"] = props.total_memory
        env["sm_count"] = props.multi_processor_count
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )
            env["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return env


def slug(text: str) -> str:
    """A folder-safe name: ``"NVIDIA H200"`` -> ``"nvidia-h200"``."""
    out = "".join(c.lower() if c.isalnum() else "-" for c in text)
    return "-".join(p for p in out.split("-") if p) or "unknown"


def make_result(
    kind: str,
    config: dict[str, Any],
    records: list[dict[str, Any]],
    summary: dict[str, Any] | None = None,
    env: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from moba_cli import __version__

    return {
        "schema": SCHEMA,
        "kind": kind,
        "created": utc_now(),
        "moba_version": __version__,
        "env": env if env is not None else collect_env(),
        "config": config,
        "records": records,
        "summary": summary or {},
    }


def write_result(result: dict[str, Any], out: Path | str | None, default_dir: Path | str) -> Path:
    """Write ``result`` as JSON. ``out`` may be a ``.json`` file or a folder; default ``default_dir``.

    Returns the file's path. Names are ``<kind>-<UTC time>.json`` so runs never overwrite each other.
    A place that cannot be written is a :class:`~moba_cli.errors.MobaError` naming the file.
    """
    from moba_cli.errors import MobaError

    target = Path(out) if out is not None else Path(default_dir)
    if target.suffix.lower() != ".json":  # r.JSON is a file too
        stamp = result["created"].replace(":", "").replace("-", "")
        target = target / f"{result['kind']}-{stamp}.json"
    tmp = target.with_suffix(".json.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
        tmp.replace(target)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise MobaError(f"cannot write the result {target}: {_os_reason(e, target)}") from None
    return target


def check_out(out: Path | str | None, default_dir: Path | str, flag: str = "--out") -> None:
    """Fail before any work when a result could not be written where ``out`` (or ``default_dir``) points.

    Creates nothing: the nearest existing folder on the way must be a folder we can write in.
    """
    import tempfile

    from moba_cli.errors import MobaError

    target = Path(out) if out is not None else Path(default_dir)
    where = f"{flag} {target}" if out is not None else f"the results folder {target} (choose another with {flag})"
    if target.suffix.lower() == ".json":
        if target.is_dir():
            raise MobaError(f"{where} is a folder; give a new .json file name or the folder without .json")
        folder = target.parent
    else:
        if target.exists() and not target.is_dir():
            raise MobaError(f"{where} is a file; give a folder or a path ending in .json")
        folder = target
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise MobaError(f"{where} cannot be created: {existing} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".moba-write-check-"):
            pass
    except OSError as e:
        raise MobaError(f"{where} cannot be written: {e.strerror or e}") from None  # not the probe's name


def _os_reason(e: OSError, path: Path) -> str:
    """Why ``path`` could not be written: a parent that is a file, else the system's words."""
    blocker = next((a for a in path.parents if a.exists() and not a.is_dir()), None)
    return f"{blocker} is a file, not a folder" if blocker is not None else (e.strerror or str(e))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def read_result(path: Path | str) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a {SCHEMA} result file")
    return data
