"""Recipes: YAML + --set typing, unknown keys, impossible combinations -> one error line, exit 1."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from moba_cli.cli import app
from moba_cli.errors import MobaError
from moba_cli.train.config import Recipe, apply_overrides, field_help, load_recipe, parse_set, recipe_from_dict
from moba_cli.train.model import SIZES, Dims, resolve_dims
from moba_cli.train.validate import switch_step, validate

BASE = {"model": {"size": "tiny"}, "attention": {"kind": "moba", "chunk": 16, "topk": 2},
        "data": {"seq_len": 64}, "train": {"steps": 10, "batch_size": 4, "device": "cpu"}}


def _recipe(**sets) -> Recipe:
    raw = apply_overrides(BASE, [(k.replace("__", "."), v) for k, v in sets.items()])
    return recipe_from_dict(raw)


def _err(**sets) -> str:
    with pytest.raises(MobaError) as e:
        validate(_recipe(**sets), check_data=False, cuda_count=0)
    return str(e.value)


def test_valid_base_and_defaults():
    r = _recipe()
    validate(r, check_data=False, cuda_count=0)
    assert r.optim.lr == 3e-4 and r.attention.full_layers == "none" and r.run_dir == Path("runs/run")


def test_set_converts_types():
    sets = parse_set(["train.steps=7", "optim.lr=1e-3", "attention.kind=full", "data.seq_len=4k",
                      "train.compile=true", "attention.switch_at=0.9", "model.layers=null"])
    r = recipe_from_dict(apply_overrides(BASE, sets))
    assert (r.train.steps, r.optim.lr, r.attention.kind, r.data.seq_len) == (7, 1e-3, "full", 4096)
    assert r.train.compile is True and r.attention.switch_at == 0.9 and r.model.layers is None


@pytest.mark.parametrize("raw, words", [
    ({"trian": {}}, "unknown recipe key 'trian'"),
    ({"train": {"stepz": 3}}, "unknown recipe key 'train.stepz'"),
    ({"train": {"steps": "many"}}, "train.steps must be an integer"),
    ({"train": {"steps": 2.5}}, "train.steps must be an integer"),
    ({"optim": {"lr": "fast"}}, "optim.lr must be a number"),
    ({"train": {"compile": "maybe"}}, "train.compile must be true/false"),
    ({"model": 3}, "model must be a mapping"),
])
def test_type_errors(raw, words):
    with pytest.raises(MobaError, match=words.replace(".", r"\.")):
        recipe_from_dict(raw)


@pytest.mark.parametrize("sets, words", [
    ({"attention__full_layers": "last:5"}, "asks for 5 layers but the model has 2"),
    ({"attention__full_layers": "7"}, "out of range"),
    ({"attention__chunk": 24}, "must divide data.seq_len"),
    ({"attention__topk": 5}, "exceeds the 4 blocks"),
    ({"attention__kind": "sparse"}, "attention.kind must be moba or full"),
    ({"attention__switch_to": "full"}, "go together"),
    ({"attention__switch_to": "moba", "attention__switch_at": 0.5}, "other kind"),
    ({"attention__switch_to": "full", "attention__switch_at": 12}, "inside the 10 training steps"),
    ({"attention__switch_to": "full", "attention__switch_at": 1.5}, "fraction in (0, 1) or a whole step"),
    ({"train__batch_size": 6, "train__micro_batch": 4}, "split evenly"),
    ({"train__device": "auto", "distributed__gpus": 2}, "this node has 0 GPU"),
    ({"train__device": "cuda"}, "no CUDA GPU"),
    ({"model__hidden": 96}, "head dim 32, 64 or 128"),
    ({"model__kv_heads": 3}, "must divide model.heads"),
    ({"model__size": "huge"}, "model.size 'huge' is unknown"),
    ({"optim__warmup_steps": 10}, "fewer than train.steps"),
    ({"train__steps": 0}, "train.steps must be positive"),
    ({"eval__copy_rows": -1}, "eval.copy_rows must be >= 0"),
    ({"sweep": {"model.sise": ["tiny"]}}, "not a recipe field"),
    ({"attention__full_impl": "xformers"}, "attention.full_impl must be"),
])
def test_impossible_combinations(sets, words):
    assert words in _err(**sets)


def test_gpus_within_node_pass():
    validate(_recipe(train__device="auto", distributed__gpus=2), check_data=False, cuda_count=2, world_size=2)


def test_full_attention_skips_moba_rules():
    validate(_recipe(attention__kind="full", attention__chunk=24), check_data=False, cuda_count=0)


def test_switch_step():
    assert switch_step(_recipe(attention__switch_to="full", attention__switch_at=0.9)) == 9
    assert switch_step(_recipe(attention__switch_to="full", attention__switch_at=3)) == 3
    assert switch_step(_recipe()) is None


def test_sizes_table_names_non_embedding_params():
    for name, dims in SIZES.items():
        n = resolve_dims(recipe_from_dict({"model": {"size": name}}).model).non_embedding_params()
        if name != "tiny":
            target = int(name[:-1]) * 1e6
            assert 0.85 * target < n < 1.15 * target, (name, n)
        assert dims["hidden"] % dims["heads"] == 0
    assert Dims(1, 8, 2, 1, 16).non_embedding_params() == 8 * 4 * 6 + 3 * 8 * 16 + 2 * 8 + 8


def test_every_field_documented():
    rows = field_help()
    assert len(rows) > 40 and all(text for _, text, _ in rows)


def test_data_dir_checked(tmp_path):
    r = _recipe(data__path=str(tmp_path / "none"))
    with pytest.raises(MobaError, match="no manifest.json"):
        validate(r, cuda_count=0)


def test_cli_errors_are_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {size: tiny}\ntrain: {steps: 3, batch_size: 4, device: cpu}\n"
                      "attention: {chunk: 16, topk: 2}\ndata: {seq_len: 64}\n")
    runner = CliRunner()
    for args, words in ((["--set", "attention.full_layers=last:9"], "the model has 2"),
                        (["--set", "train.bogus=1"], "unknown recipe key 'train.bogus'"),
                        (["--set", "novalue"], "write key.sub=value"),
                        ([], "data.path is empty")):
        res = runner.invoke(app, ["train", str(recipe), *args])
        assert res.exit_code == 1, res.output
        lines = [x for x in res.output.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and words in res.output, res.output
    res = runner.invoke(app, ["train", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 1 and "does not exist" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    res = runner.invoke(app, ["train", str(bad)])
    assert res.exit_code == 1 and "not valid YAML" in res.output


def test_load_recipe_names_from_file(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("train: {steps: 5}\n")
    assert load_recipe(f).name == "mine"
    assert load_recipe(f, ["name=other"]).name == "other"
