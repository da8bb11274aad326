"""`moba train` on the CPU: the smoke recipe end to end, resume after a kill, the attention switch, SFT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from train_data_fixture import make_data_dir
from typer.testing import CliRunner

from moba_cli.cli import app
from moba_cli.train.config import load_recipe

SMOKE = Path(__file__).resolve().parent.parent / "recipes" / "smoke.yaml"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("data") / "d", n_docs=60)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_smoke_recipe_end_to_end(tmp_path):
    """`moba data build --config recipes/smoke.yaml`, then `moba train recipes/smoke.yaml`."""
    data = tmp_path / "data"
    built = CliRunner().invoke(app, ["data", "build", "--config", str(SMOKE), "--out", str(data),
                                     "--result", str(tmp_path / "build.json")])
    assert built.exit_code == 0, built.output
    run = tmp_path / "run"
    args = ["train", str(SMOKE), "--set", f"data.path={data}", "--set", f"log.out={run}",
            "--set", "log.progress=false"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss", "lr", "grad_norm", "tokens_per_s"))
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and len(evals[-1]["val_loss_by_position"]) == 4
    # the copy probe: an untrained model does not copy, so both copies cost about ln(vocab)
    vocab = load_recipe(SMOKE).data.build["vocab_size"]
    for r in evals:
        first, second = r["val_copy_loss_first"], r["val_copy_loss_second"]
        assert abs(second - first) < 0.5 < first < 2 * math.log(vocab)
    assert rows[-1]["loss"] < rows[0]["loss"]  # lr 1e-3 on a tiny model learns within 6 steps
    result = json.loads((run / "result.json").read_text())
    assert result["kind"] == "train" and result["summary"]["final_val_loss"] == evals[-1]["val_loss"]
    assert result["summary"]["val_copy_loss_second"] == evals[-1]["val_copy_loss_second"]
    assert (run / "recipe.yaml").is_file() and (run / "checkpoints" / "latest").read_text().strip() == "step-6"
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-3", "step-6"]

    # The checkpoint is an ordinary HF directory: MoBA by default, full attention on request.
    from transformers import AutoTokenizer

    import moba_cli

    ckpt = run / "checkpoints" / "step-6"
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = torch.tensor([tok("the passkey is 1234; remember it")["input_ids"] * 4])
    moba = moba_cli.load_model(str(ckpt))
    full = moba_cli.load_model(str(ckpt), attn="full")
    assert moba.config.moba["chunk_size"] == 16 and moba.config.moba["topk"] == 2
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["attn_implementation"] == "moba" and saved["use_cache"] is True
    assert "backend" not in saved["moba"]  # the recipe's auto, not the CPU's reference choice
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(ckpt).config._attn_implementation == "moba"
    with torch.no_grad():
        a, b = moba(input_ids=ids).logits, full(input_ids=ids).logits
    assert torch.isfinite(a).all() and a.shape == b.shape

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "already holds a run" in again.output
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    other = CliRunner().invoke(app, [*args[:-4], "--set", f"log.out={mine}", "--resume"])
    assert other.exit_code == 1 and "not a moba run's" in other.output
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def _recipe(data_dir: Path, out: Path, *sets: str):
    return load_recipe(SMOKE, [f"data.path={data_dir}", f"log.out={out}", "log.progress=false", *sets])


def test_resume_after_kill_gives_the_same_losses(data_dir, tmp_path, monkeypatch):
    """6 steps straight vs killed during step 5 and resumed from step 3: identical losses (across a switch)."""
    from moba_cli.train import loop

    sets = ("attention.switch_to=full", "attention.switch_at=0.5", "eval.every=0")
    whole = tmp_path / "whole"
    loop.train(_recipe(data_dir, whole, *sets))
    ref = _metrics(whole)
    assert [r["attention"] for r in ref] == ["moba"] * 3 + ["full"] * 3

    killed = tmp_path / "killed"
    real, calls = loop.token_loss, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # 2 micro-batches a step: the first of step 5
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "token_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        loop.train(_recipe(data_dir, killed, *sets))
    monkeypatch.setattr(loop, "token_loss", real)
    assert [r["step"] for r in _metrics(killed)] == [1, 2, 3, 4]  # step 4 ran past the last checkpoint
    loop.train(_recipe(data_dir, killed, *sets), resume=True)
    got = _metrics(killed)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-6, abs=0)
    assert got[-1]["val_loss"] == pytest.approx(ref[-1]["val_loss"], rel=1e-6)


def test_sft_mask_and_init_from(tmp_path):
    """SFT data counts only answer tokens; init_from continues from a checkpoint (its loss, not a random one)."""
    from moba_cli.train import loop

    sft = make_data_dir(tmp_path / "sft", n_docs=40, sft=True)
    first = tmp_path / "first"
    r1 = loop.train(_recipe(sft, first, "data.sft=true", "train.steps=3", "checkpoint.every=0",
                            "attention.kind=full", "optim.lr=3e-3"))
    rows = _metrics(first)
    all_tokens = 4 * 64 * 1 - 4  # eval.batches=1 of 4 rows, minus the unpredictable last positions
    assert 0 < rows[-1]["val_tokens"] < 0.75 * all_tokens
    second = tmp_path / "second"
    ckpt = r1["summary"]["checkpoint"]
    loop.train(_recipe(sft, second, "data.sft=true", "train.steps=2", f"model.init_from={ckpt}",
                       "optim.lr=1e-9", "attention.kind=moba", "attention.chunk=64", "attention.topk=1"))
    cont = _metrics(second)
    # One block of 64 with top-1 is full causal attention: the continued model starts where the first ended.
    assert cont[-1]["val_loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-4)


def test_activation_checkpointing_changes_memory_not_math(data_dir, tmp_path, monkeypatch):
    from moba_cli.train import loop, model

    built = []
    real_build = model.build_model
    monkeypatch.setattr(model, "build_model", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        loop.train(_recipe(data_dir, out, "train.steps=2", "checkpoint.final=false", "checkpoint.every=0",
                           f"train.activation_checkpointing={flag}"))
        runs[flag] = _metrics(out)
        assert not (out / "checkpoints").exists()
    flag = "is_activation_checkpointing" if hasattr(built[0], "is_activation_checkpointing") else (
        "is_gradient_checkpointing")
    assert [getattr(m, flag) for m in built] == [False, True]
    assert [r["loss"] for r in runs["true"]] == pytest.approx([r["loss"] for r in runs["false"]], rel=1e-6)
    assert [r["grad_norm"] for r in runs["true"]] == pytest.approx([r["grad_norm"] for r in runs["false"]], rel=1e-5)
