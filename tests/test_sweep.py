"""`moba sweep`: the grid, the scaling-law fit on synthetic points, and a 2-point sweep end to end on CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from train_data_fixture import make_data_dir
from typer.testing import CliRunner

from moba_cli.cli import app
from moba_cli.errors import MobaError
from moba_cli.train.config import recipe_from_dict
from moba_cli.train.fit import fit_power_law, predict
from moba_cli.train.sweep import grid

SMOKE = Path(__file__).resolve().parent.parent / "recipes" / "smoke.yaml"
COMPUTE = np.geomspace(1e15, 1e19, 7)


def _noisy(values: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    return values * np.exp(np.random.default_rng(seed).normal(0, sigma, len(values)))


def test_fit_recovers_power_law_exponent():
    loss = _noisy(6.0 * COMPUTE**-0.06, 0.003, 0)
    f = fit_power_law(COMPUTE, loss, irreducible=False)
    assert abs(f["b"] - 0.06) < 3 * f["b_err"] + 1e-3 and f["b_err"] < 0.002
    assert f["a"] == pytest.approx(6.0, rel=0.1) and f["e"] is None


def test_fit_recovers_irreducible_term():
    pytest.importorskip("scipy")
    loss = _noisy(1.8 + 300.0 * COMPUTE**-0.15, 0.001, 1)
    f = fit_power_law(COMPUTE, loss)
    assert f["irreducible"] == "fitted" and f["method"] == "scipy curve_fit"
    assert f["b"] == pytest.approx(0.15, abs=0.01) and f["e"] == pytest.approx(1.8, abs=0.05)
    assert f["e_err"] is not None and np.max(np.abs(predict(f, COMPUTE) / loss - 1)) < 0.01


def test_fit_without_scipy_uses_loglog_with_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy -> ImportError
    loss = _noisy(4.0 * COMPUTE**-0.08, 0.002, 2)
    f = fit_power_law(COMPUTE, loss)
    assert f["method"] == "log-log least squares" and f["irreducible"] == "needs scipy"
    assert abs(f["b"] - 0.08) < 4 * f["b_err"] and f["a_err"] > 0
    exact = fit_power_law(COMPUTE[:2], 4.0 * COMPUTE[:2] ** -0.08)
    assert exact["b"] == pytest.approx(0.08, rel=1e-9) and exact["b_err"] is None


def test_fit_rejects_bad_points():
    with pytest.raises(MobaError, match="at least two"):
        fit_power_law([1e18], [3.0])
    with pytest.raises(MobaError, match="positive"):
        fit_power_law([1e18, 1e19], [3.0, -1.0])
    with pytest.raises(MobaError, match="same compute"):
        fit_power_law([1e18, 1e18], [3.0, 2.0])


def test_grid_names_and_order():
    r = recipe_from_dict({"sweep": {"model.size": ["tiny", "20M"], "attention.kind": ["moba", "full"]}})
    names = [n for n, _ in grid(r)]
    assert names == ["size-tiny_kind-moba", "size-tiny_kind-full", "size-20M_kind-moba", "size-20M_kind-full"]
    with pytest.raises(MobaError, match="no sweep"):
        grid(recipe_from_dict({}))
    zipped = recipe_from_dict({"sweep": {"model.size,train.steps": [["3M", 10], ["5M", 20]],
                                         "attention.kind": ["moba"]}})
    assert grid(zipped) == [("size-3M_steps-10_kind-moba", {"model.size": "3M", "train.steps": 10,
                                                             "attention.kind": "moba"}),
                            ("size-5M_steps-20_kind-moba", {"model.size": "5M", "train.steps": 20,
                                                             "attention.kind": "moba"})]
    with pytest.raises(MobaError, match="each value must be a list of 2"):
        grid(recipe_from_dict({"sweep": {"model.size,train.steps": ["3M"]}}))


def test_two_point_sweep_end_to_end(tmp_path):
    data = make_data_dir(tmp_path / "data", n_docs=40)
    out = tmp_path / "sweep"
    args = ["sweep", str(SMOKE), "--out", str(out), "--set", f"data.path={data}", "--set", "train.steps=2",
            "--set", "eval.every=0", "--set", "checkpoint.every=0", "--set", "log.progress=false",
            "--set", "sweep={attention.kind: [moba, full]}"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "sweep"
    recs = summary["records"]
    assert [r["attn"] for r in recs] == ["moba", "full"] and all(r["final_val_loss"] > 0 for r in recs)
    assert recs[0]["compute"] < recs[1]["compute"]  # MoBA attends fewer pairs at the same size and tokens
    gap = summary["summary"]["gaps"][0]
    assert gap["size"] == "tiny" and gap["gap"] == pytest.approx(recs[0]["final_val_loss"] - recs[1]["final_val_loss"])
    assert (out / "points" / "kind-moba" / "checkpoints" / "latest").is_file()
    stamp = (out / "points" / "kind-full" / "metrics.jsonl").stat().st_mtime_ns
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "2 finished, 0 to run" in again.output
    assert (out / "points" / "kind-full" / "metrics.jsonl").stat().st_mtime_ns == stamp


def test_sweep_point_errors_name_the_point(tmp_path):
    res = CliRunner().invoke(app, ["sweep", str(SMOKE), "--out", str(tmp_path / "s"),
                                   "--set", "sweep={attention.chunk: [16, 24]}"])
    assert res.exit_code == 1 and "error: sweep point chunk-24" in res.output and "must divide" in res.output


@pytest.mark.slow
def test_points_side_by_side_as_subprocesses(tmp_path, monkeypatch):
    """--gpus 2: each point is a `moba train` subprocess with its own CUDA_VISIBLE_DEVICES (CPU-run here)."""
    from moba_cli.train import sweep
    from moba_cli.train.config import load_recipe
    from moba_cli.train.sweep import run_sweep

    monkeypatch.setattr(sweep, "gpu_count", lambda: 2)
    data = make_data_dir(tmp_path / "data", n_docs=40)
    recipe = load_recipe(SMOKE, [f"data.path={data}", "train.steps=2", "eval.every=0", "checkpoint.every=0",
                                 "train.device=cpu", "sweep={attention.kind: [moba, full]}"])
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)  # `python -m moba_cli` imports this tree
    result = run_sweep(recipe, tmp_path / "sweep", gpus=2)
    assert [r["attn"] for r in result["records"]] == ["moba", "full"]
    logs = sorted(p.name for p in (tmp_path / "sweep" / "logs").iterdir())
    assert logs == ["kind-full.log", "kind-moba.log"]
    with pytest.raises(MobaError, match="this node has 2 GPU"):
        run_sweep(recipe, tmp_path / "other", gpus=3)


def test_plots_and_gaps_with_fits(tmp_path):
    pytest.importorskip("matplotlib")
    from moba_cli.train.plots import plot_sweep
    from moba_cli.train.sweep import loss_gaps

    records = []
    for attn, offset in (("moba", 0.02), ("full", 0.0)):
        for size, c in (("3M", 1e16), ("5M", 3e16), ("10M", 1e17)):
            loss = 20 * c**-0.05 + offset
            records.append({"attn": attn, "size": size, "compute": c, "final_val_loss": loss, "switch_to": None,
                            "trailing_val_loss": loss + 0.1, "val_loss_by_position": [loss + 0.3, loss + 0.1],
                            "seq_len": 8192})
    fits = {a: fit_power_law([r["compute"] for r in records if r["attn"] == a],
                             [r["final_val_loss"] for r in records if r["attn"] == a]) for a in ("moba", "full")}
    assert fits["full"]["b"] == pytest.approx(0.05, rel=1e-3)
    paths = plot_sweep(records, fits, tmp_path)
    for key in ("loss_vs_compute", "trailing_loss"):
        assert Path(paths[key]).stat().st_size > 10_000
    gaps = loss_gaps(records)
    assert [g["size"] for g in gaps] == ["3M", "5M", "10M"]
    assert all(g["gap"] == pytest.approx(0.02) and g["trailing_gap"] == pytest.approx(0.02) for g in gaps)
