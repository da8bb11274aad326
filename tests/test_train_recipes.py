"""Every recipe in recipes/ loads, validates (with its data build section) and expands its sweep."""

from __future__ import annotations

from pathlib import Path

import pytest

from moba_cli.train.config import load_recipe
from moba_cli.train.sweep import grid, point_recipes
from moba_cli.train.validate import validate

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
EXPECTED = {"smoke", "scaling-tiny", "trailing-32k", "needle-small", "moba-then-full", "hybrid-sft"}


def test_the_issue_recipes_exist():
    assert EXPECTED <= {p.stem for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(path, tmp_path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem and recipe.description
    validate(recipe, check_data=False, cuda_count=8)
    header = path.read_text().split("\nname:")[0]
    assert "H200" in header and "estimate" in header.lower(), "the header says what it costs and that it is an estimate"
    if recipe.sweep:
        points = point_recipes(recipe, tmp_path / "sweep", check_data=False)
        assert len(points) == len(grid(recipe)) >= 2


def test_scaling_tiny_is_the_papers_setting():
    r = load_recipe(RECIPES[0].parent / "scaling-tiny.yaml")
    assert (r.data.seq_len, r.attention.chunk, r.attention.topk) == (8192, 512, 3)
    points = point_recipes(r, Path("unused"), check_data=False)
    sizes = {p.model.size for _, p in points}
    assert len(sizes) >= 4 and {p.attention.kind for _, p in points} == {"moba", "full"}
    from moba_cli.train.model import resolve_dims

    for _, p in points:  # about 20 tokens per non-embedding parameter
        ratio = p.train.steps * p.train.batch_size * p.data.seq_len / resolve_dims(p.model).non_embedding_params()
        assert 18 < ratio < 22, (p.model.size, ratio)
