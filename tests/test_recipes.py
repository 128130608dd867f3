"""Every shipped recipe: a header that names its own run command, and a valid body."""

from __future__ import annotations

from pathlib import Path

import pytest

from ngkit.binding import component_tables
from ngkit.cli.main import main
from ngkit.plugins import get_registry
from ngkit.priors.recipe import is_prior_recipe, load_prior_recipe
from ngkit.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.toml"))


def test_there_are_recipes():
    assert any(p.name == "quickstart.toml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_header_names_its_run_command(path: Path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    assert header, f"{path} must open with a comment saying what it trains"
    rel = path.relative_to(ROOT).as_posix()
    commands = (f"ngkit run {rel}", f"ngkit compare {rel}", f"ngkit prior train {rel}")
    assert any(c in text for c in commands), f"header must give the command for {rel}"
    assert "Needs:" in text, "header must say what the recipe needs (data, hardware, time)"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_validates_and_names_registered_components(path: Path):
    if is_prior_recipe(path):
        recipe = load_prior_recipe(path)
        assert recipe.prior.name in get_registry().names("priors")
        return
    recipe = load_recipe(path)
    registry = get_registry()
    for kind, table, _ in component_tables(recipe):
        assert table["name"] in registry.names(kind)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_builds_in_recipes_validate(path: Path, trusted, capsys):
    """Every component built (on the meta device) and shape-checked, as `ngkit run` would; GPU
    recipes checked as for a machine with a GPU."""
    from ngkit.priors.recipe import is_prior_recipe

    gpu = ["--gpu"] if not is_prior_recipe(path) and load_recipe(path).distributed.precision == "fp16" else []
    assert main(["recipes", "validate", *gpu, str(path)]) == 0, capsys.readouterr().err


def test_compare_quantizers_runs_every_variant(tmp_path: Path, monkeypatch):
    """recipes/compare-quantizers.toml: every quantizer and DAPS-NA train 2 steps in one compare,
    each at the same 128 bits per image."""
    import json

    pytest.importorskip("vector_quantize_pytorch")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "cq"
    args = ["compare", str(ROOT / "recipes" / "compare-quantizers.toml"), "--steps", "2", "--out", str(out),
            "--set", "run.eval_every=0", "--set", "eval.num_images=8", "--set", 'eval.metrics=["mse","usage"]']
    assert main(args) == 0
    table = json.loads((out / "results.json").read_text())["table"]
    assert len(table) == len(load_recipe(ROOT / "recipes" / "compare-quantizers.toml").compare.variants) >= 10
    assert {row["bits_per_image"] for row in table} == {128}
    assert all(row["step"] == 2 for row in table)
