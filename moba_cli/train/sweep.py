"""``moba sweep``: a grid of training runs from one recipe, then scaling-law fits per attention kind.

Sweep folder::

    recipe.yaml                the sweep recipe as resolved (with its sweep: grid)
    points/<name>/             one `moba train` run folder per grid point (recipe.yaml, metrics, checkpoints)
    logs/<name>.log            output of points run as subprocesses (--gpus N)
    summary.json               moba-result/1, kind "sweep": a record per point and the fits
    loss_vs_compute.png, trailing_loss.png

A point whose folder has result.json is finished and skipped; one with a started run is resumed.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from moba_cli.errors import MobaError
from moba_cli.train.config import Recipe, apply_overrides, recipe_from_dict


def grid(recipe: Recipe) -> list[tuple[str, dict[str, Any]]]:
    """The points of ``recipe.sweep`` as ``(name, {dotted key: value})``, in a fixed order.

    A key ``a.b,c.d`` is one axis over several fields that change together: its values are lists
    ``[value_of_a.b, value_of_c.d]`` (e.g. each model size with its own step count).
    """
    if not recipe.sweep:
        raise MobaError("the recipe has no sweep: section (e.g. sweep: {model.size: [tiny, 20M], "
                        "attention.kind: [moba, full]})")
    axes = []
    for key, values in recipe.sweep.items():
        if not isinstance(values, list) or not values:
            raise MobaError(f"sweep.{key} must be a non-empty list of values")
        fields = [k.strip() for k in key.split(",")]
        options = []
        for v in values:
            vs = v if len(fields) > 1 else [v]
            if not isinstance(vs, list) or len(vs) != len(fields):
                raise MobaError(f"sweep.{key}: each value must be a list of {len(fields)} (one per field), got {v!r}")
            options.append(dict(zip(fields, vs, strict=True)))
        axes.append(options)
    points = []
    for combo in itertools.product(*axes):
        assignment = {k: v for part in combo for k, v in part.items()}
        name = "_".join(f"{k.split('.')[-1]}-{_safe(v)}" for k, v in assignment.items())
        points.append((name, assignment))
    names = [n for n, _ in points]
    if len(set(names)) != len(names):
        raise MobaError("two sweep points get the same folder name; make the swept values distinct")
    return points


def _safe(value: Any) -> str:
    text = str(value)
    if "/" in text:  # a path (init_from): its last part names it
        text = text.rstrip("/").rsplit("/", 1)[-1]
    return "".join(c if c.isalnum() or c in ".+" else "-" for c in text) or "none"


def point_recipes(recipe: Recipe, sweep_dir: Path, check_data: bool = True) -> list[tuple[str, Recipe]]:
    """Each grid point as a full recipe running in ``sweep_dir/points/<name>`` (all validated first)."""
    from moba_cli.train.validate import validate

    base = recipe.to_dict()
    base["sweep"] = {}
    out = []
    for name, assignment in grid(recipe):
        raw = apply_overrides(base, [*assignment.items(), ("log.out", str(sweep_dir / "points" / name)),
                                     ("name", f"{recipe.name}-{name}")])
        try:
            point = recipe_from_dict(raw)
            validate(point, check_data=False)
        except MobaError as e:
            raise MobaError(f"sweep point {name}: {e}") from None
        out.append((name, point))
    if out and check_data:
        from moba_cli.train.validate import check_data_dir

        for _, p in out:
            check_data_dir(p)
    return out


def _state(run_dir: Path) -> str:
    if (run_dir / "result.json").is_file():
        return "done"
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists():
        return "started"
    return "new"


def run_sweep(recipe: Recipe, sweep_dir: Path, *, gpus: int = 0, console: Any = None) -> dict[str, Any]:
    """Train every unfinished point (in this process, or ``gpus`` at a time as subprocesses), then summarise."""
    import yaml

    points = point_recipes(recipe, sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    todo = [(n, p) for n, p in points if _state(p.run_dir) != "done"]
    say = console.print if console is not None else (lambda *a, **k: None)
    say(f"sweep: {len(points)} points, {len(points) - len(todo)} finished, {len(todo)} to run")
    if gpus and gpus > 0:
        _run_parallel(todo, sweep_dir, gpus, say)
    else:
        from moba_cli.train.loop import train

        for name, point in todo:
            say(f"point {name}")
            train(point, resume=_state(point.run_dir) == "started", console=console)
    return summarize(recipe, points, sweep_dir)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _run_parallel(todo: list[tuple[str, Recipe]], sweep_dir: Path, gpus: int, say: Any) -> None:
    """One point per GPU (``CUDA_VISIBLE_DEVICES``), a new one as soon as a GPU is free."""
    import yaml

    have = gpu_count()
    if gpus > have:
        raise MobaError(f"--gpus {gpus} but this node has {have} GPU(s)")
    logs = sweep_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    queue = list(todo)
    running: dict[int, tuple[str, subprocess.Popen, Any]] = {}
    failed = []
    while queue or running:
        for gpu in range(gpus):
            if gpu not in running and queue:
                name, point = queue.pop(0)
                spec = point.run_dir.parent / f"{name}.yaml"
                spec.parent.mkdir(parents=True, exist_ok=True)
                spec.write_text(yaml.safe_dump(point.to_dict(), sort_keys=False))
                cmd = [sys.executable, "-m", "moba_cli", "train", str(spec), "--set", "log.progress=false"]
                if _state(point.run_dir) == "started":
                    cmd.append("--resume")
                log = (logs / f"{name}.log").open("a")
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
                running[gpu] = (name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
                say(f"point {name} on GPU {gpu}")
        time.sleep(1.0)
        for gpu, (name, proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[gpu]
                if proc.returncode != 0:
                    failed.append(name)
                    say(f"point {name} failed (exit {proc.returncode}); see {logs / (name + '.log')}")
    if failed:
        raise MobaError(f"{len(failed)} sweep point(s) failed: {', '.join(failed)}; rerun the sweep to resume them")


def summarize(recipe: Recipe, points: list[tuple[str, Recipe]], sweep_dir: Path) -> dict[str, Any]:
    """summary.json (kind ``sweep``): a record per finished point, fits per attention kind, plots."""
    from moba_cli.results import make_result, write_result
    from moba_cli.train.fit import fit_power_law

    records = []
    for name, point in points:
        path = point.run_dir / "result.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())["summary"]
        by_pos = s.get("val_loss_by_position") or []
        records.append({
            "point": name, "attn": attn_label(point), "switch_to": point.attention.switch_to,
            "size": point.model.size, "params": s["params"], "non_embedding_params": s["non_embedding_params"],
            "tokens": s["tokens"], "compute": s["compute_flops"], "seq_len": point.data.seq_len,
            "final_val_loss": s["final_val_loss"], "trailing_val_loss": by_pos[-1] if by_pos else None,
            "val_loss_by_position": by_pos, **{f"sweep.{k}": v for k, v in grid_values(recipe, name).items()},
        })
    fits: dict[str, Any] = {}
    for attn in sorted({r["attn"] for r in records}):
        pts = [r for r in records if r["attn"] == attn and r["final_val_loss"]]
        if len({r["compute"] for r in pts}) >= 2:
            fits[attn] = fit_power_law([r["compute"] for r in pts], [r["final_val_loss"] for r in pts])
    summary = {"points": len(points), "finished": len(records), "fits": fits, "gaps": loss_gaps(records)}
    result = make_result("sweep", recipe.to_dict(), records, summary)
    write_result(result, sweep_dir / "summary.json", sweep_dir)
    from moba_cli.train.plots import plot_sweep

    result["summary"]["plots"] = plot_sweep(records, fits, sweep_dir)
    write_result(result, sweep_dir / "summary.json", sweep_dir)
    return result


def attn_label(point: Recipe) -> str:
    """``moba``, ``full``, or ``moba->full`` for a run that switches: fits and gaps group by this label."""
    a = point.attention
    return f"{a.kind}->{a.switch_to}" if a.switch_to else a.kind


def grid_values(recipe: Recipe, name: str) -> dict[str, Any]:
    return next(a for n, a in grid(recipe) if n == name)


def loss_gaps(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """MoBA minus full validation loss at every size trained with both (same other settings)."""
    out = []
    for size in dict.fromkeys(r["size"] for r in records):
        by = {r["attn"]: r for r in records if r["size"] == size and not r["switch_to"]}
        if "moba" in by and "full" in by and by["moba"]["final_val_loss"] and by["full"]["final_val_loss"]:
            gap = {"size": size, "moba": by["moba"]["final_val_loss"], "full": by["full"]["final_val_loss"]}
            gap["gap"] = gap["moba"] - gap["full"]
            tm, tf = by["moba"]["trailing_val_loss"], by["full"]["trailing_val_loss"]
            gap["trailing_gap"] = tm - tf if tm is not None and tf is not None else None
            out.append(gap)
    return out
