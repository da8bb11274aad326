"""`moba data build` through the Typer app: results, one-line errors, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moba_cli.commands.data import app
from moba_cli.train.data import TokenDataset

runner = CliRunner()


@pytest.fixture
def corpus(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(20):
        (folder / f"{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * (5 + i))
    return folder


def invoke(*args: str):
    return runner.invoke(app, ["build", *args])


def test_build_from_flags(tmp_path, corpus):
    res = invoke("--source", "files", "--files", str(corpus), "--source", "synthetic", "--synthetic-docs", "3",
                 "--synthetic-lengths", "200", "--synthetic-tasks", "kv,passkey", "--vocab", "300",
                 "--val-fraction", "0.2", "--out", str(tmp_path / "ds"), "--result", str(tmp_path / "r.json"))
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["schema"] == "moba-result/1" and result["kind"] == "data-build"
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert result["summary"]["manifest_hash"] == manifest["manifest_hash"]
    assert [r["kind"] for r in result["records"]] == ["files", "synthetic"]
    assert result["records"][1]["docs"] == 3
    assert result["config"]["sources"][1]["tasks"] == ["kv", "passkey"]
    assert TokenDataset(tmp_path / "ds", "val").n_docs > 0
    assert "files_hash" in res.output


def test_build_from_a_recipe_config(tmp_path, corpus):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"data:\n  path: {tmp_path / 'from-recipe'}\n  seq_len: 128\n  build:\n    vocab_size: 300\n"
        f"    val_fraction: 0.2\n    max_tokens: 2k\n    sources:\n      - kind: files\n        paths: [{corpus}]\n"
    )
    res = invoke("--config", str(recipe), "--result", str(tmp_path / "r.json"))
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "from-recipe" / "manifest.json").read_text())
    assert manifest["config"]["max_tokens"] == 2048
    # --out wins over the recipe's path, and the same build gives the same hash
    res = invoke("--config", str(recipe), "--out", str(tmp_path / "again"), "--result", str(tmp_path / "r2.json"))
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert again["manifest_hash"] == manifest["manifest_hash"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "web", "--out", "X"], "unknown source 'web'"),
        (["--source", "files", "--out", "X"], "--source files needs --files"),
        (["--source", "files", "--files", "MISSING", "--out", "X"], "file not found"),
        (["--source", "files", "--files", "CORPUS", "--vocab", "100", "--out", "X"], "--vocab 100 is too small"),
        (["--source", "files", "--files", "CORPUS", "--max-tokens", "lots", "--out", "X"], "--max-tokens"),
        (["--source", "files", "--files", "CORPUS"], "no output folder"),
        (["--source", "files", "--files", "EMPTY", "--out", "X"], "empty corpus"),
        (["--source", "synthetic", "--out", "X"], "never end"),
        (["--config", "MISSING", "--out", "X"], "file not found"),
        ([], "nothing to build"),
    ],
)
def test_errors_are_one_line(tmp_path, corpus, args, message):
    (tmp_path / "empty").mkdir()
    subst = {"CORPUS": str(corpus), "MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path / "empty"),
             "X": str(tmp_path / "out")}
    res = invoke(*[subst.get(a, a) for a in args], "--result", str(tmp_path / "r.json"))
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines[0].startswith("error:") and message in " ".join(lines), res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_existing_dataset_needs_overwrite(tmp_path, corpus):
    args = ["--source", "files", "--files", str(corpus), "--vocab", "300", "--val-fraction", "0.2",
            "--out", str(tmp_path / "ds"), "--result", str(tmp_path / "r")]
    assert invoke(*args).exit_code == 0
    res = invoke(*args)
    assert res.exit_code == 1 and "--overwrite" in res.output
    assert invoke(*args, "--overwrite").exit_code == 0
