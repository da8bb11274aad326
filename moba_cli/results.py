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

Files are strict JSON (a non-finite number is null plus a ``non_finite`` note in its dict). A run writing
into a folder always adds a file of its own (``<kind>-<time>-<pid>-<random>.json``), so parallel runs with
the same ``--out`` folder never overwrite each other.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import secrets
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


def is_json_file(target: Path | str) -> bool:
    """Whether ``--out`` names a file (``r.json``, ``r.JSON``) rather than a folder."""
    return Path(target).suffix.lower() == ".json"


def result_path(kind: str, out: Path | str | None, default_dir: Path | str, created: str | None = None) -> Path:
    """The file a result goes to: ``out`` itself when it is a .json name, else a new name in the folder.

    New names are ``<kind>-<UTC time>-<pid>-<random>.json``: two runs started in the same second (same or
    different machines sharing the folder) never pick the same one. Nothing is created here.
    """
    target = Path(out) if out is not None else Path(default_dir)
    if is_json_file(target):
        return target
    stamp = (created or utc_now()).replace(":", "").replace("-", "")
    return target / f"{kind}-{stamp}-{os.getpid()}-{secrets.token_hex(3)}.json"


def write_result(result: dict[str, Any], out: Path | str | None, default_dir: Path | str) -> Path:
    """Write ``result`` as strict JSON and return the file's path.

    ``out`` is a .json file (replaced atomically if it exists: the user named it) or a folder (default
    ``default_dir``), where each call adds a new file (see :func:`result_path`) and never replaces one.
    Non-finite numbers become null with a note (see :func:`strict_json`). The text goes to a temporary file
    of its own first, so readers never see half a file. A place that cannot be written is a
    :class:`~moba_cli.errors.MobaError` naming the file.
    """
    from moba_cli.errors import MobaError

    text = json.dumps(strict_json(result), indent=2, allow_nan=False) + "\n"
    named = is_json_file(out if out is not None else default_dir)  # a file the caller named, not a folder
    target = result_path(result["kind"], out, default_dir, result.get("created"))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _write_temp(target.parent, target.name, text)
        try:
            if named:
                os.replace(tmp, target)
            else:
                target = _publish_new(tmp, result["kind"], target, result.get("created"))
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    except OSError as e:
        raise MobaError(f"cannot write the result {target}: {_os_reason(e, target)}") from None
    return target


def _write_temp(folder: Path, name: str, text: str) -> Path:
    """``text`` in a new hidden file of this process in ``folder`` (created exclusively, mode from the umask)."""
    while True:
        tmp = folder / f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp


def _publish_new(tmp: Path, kind: str, target: Path, created: str | None) -> Path:
    """Give ``tmp`` the name ``target`` without replacing any file; on a clash, pick another new name."""
    for _ in range(100):
        try:
            os.link(tmp, target)  # fails if target exists: no run ever replaces another's file
            return target
        except FileExistsError:
            pass
        except OSError:  # no hard links on this filesystem: claim the name exclusively, then fill it
            try:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:
                pass
            else:
                os.replace(tmp, target)
                return target
        target = result_path(kind, target.parent, target.parent, created)
    raise FileExistsError(17, "no free result name", str(target))


def strict_json(value: Any) -> Any:
    """A copy of ``value`` that strict JSON parsers accept.

    NaN and +-Infinity become null, and the dict that held them gets ``"non_finite": {key: "NaN", ...}``
    (list items are named ``key[i]``), so a reader can tell a missing number from a non-finite one.
    numpy/torch scalars and arrays become numbers and lists, paths strings, tuples lists.
    """
    if isinstance(value, dict):
        notes: dict[str, str] = {}
        out = {k: _strict_item(v, str(k), notes) for k, v in value.items()}
        if notes:
            out["non_finite"] = {**(out.get("non_finite") or {}), **notes}
        return out
    return _strict_item(value, "value", {})


def _strict_item(value: Any, where: str, notes: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return strict_json(value)
    if isinstance(value, Path):
        return str(value)
    if not isinstance(value, (str, bytes, int, float, list, tuple)) and hasattr(value, "tolist"):
        value = value.tolist()  # numpy/torch scalars and arrays
    if isinstance(value, (list, tuple)):
        return [_strict_item(v, f"{where}[{i}]", notes) for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        notes[where] = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return None
    return value


def check_out(out: Path | str | None, default_dir: Path | str, flag: str = "--out") -> None:
    """Fail before any work when a result could not be written where ``out`` (or ``default_dir``) points.

    Creates nothing: the nearest existing folder on the way must be a folder we can write in.
    """
    import tempfile

    from moba_cli.errors import MobaError

    target = Path(out) if out is not None else Path(default_dir)
    where = f"{flag} {target}" if out is not None else f"the results folder {target} (choose another with {flag})"
    if is_json_file(target):
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


def read_result(path: Path | str) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a {SCHEMA} result file")
    return data
