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


def test_vqgan_style_recipe_runs_a_few_steps(tmp_path, monkeypatch):
    """recipes/vqgan-style.toml as shipped, on a random VGG-16 file trusted as the published one,
    3 steps with the adversarial term from step 2: both losses logged, EMA exported."""
    import hashlib
    from dataclasses import replace

    import torch

    from ngkit import weights
    from ngkit.engine.artifacts import read_jsonl
    from ngkit.engine.train_loop import train
    from ngkit.export import export
    from ngkit.recipe import parse_recipe, read_toml
    from ngkit_plugins.lpips_loss import LPIPS

    vgg = tmp_path / "vgg16-random.pth"
    torch.save(LPIPS().net.state_dict(), vgg)
    digest = hashlib.sha256(vgg.read_bytes()).hexdigest()
    monkeypatch.setitem(weights.KNOWN_WEIGHTS, "vgg16", replace(weights.KNOWN_WEIGHTS["vgg16"], sha256=digest))
    monkeypatch.setenv("NGKIT_VGG16_WEIGHTS", str(vgg))
    raw = read_toml(ROOT / "recipes" / "vqgan-style.toml")
    raw["data"]["batch_size"] = 4
    raw["run"].update(steps=3, log_every=1, eval_every=0)
    raw["eval"].update(num_images=8, batch_size=8)
    raw["loss"][1]["start"] = 2
    out = tmp_path / "run"
    train(parse_recipe(raw, "vqgan-style"), out, quiet=True)
    records = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert all("loss/lpips" in r for r in records)
    assert ["loss/patchgan" in r for r in records] == [False, True, True]
    assert (out / "tensorboard").is_dir()
    assert export(out, out / "export").config["weights"] == "ema"


PAPER_MNIST_SHORT = ["--set", "run.eval_every=0", "--set", "eval.num_images=64", "--set", "eval.batch_size=64",
                     "--set", 'eval.metrics=["mse", "psnr", "usage"]']


def test_paper_mnist_trains_a_few_steps(tmp_path, capsys):
    """recipes/paper-mnist.toml as shipped (DAPS-NA, batch 256, K = 8, 8 tokens of 7 x 14,
    Bernoulli MLP decoder on binarised mnist) for 2 steps and a short evaluation."""
    import json

    out = tmp_path / "mnist"
    args = ["run", str(ROOT / "recipes" / "paper-mnist.toml"), "--out", str(out), "--set", "run.steps=2", *PAPER_MNIST_SHORT]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 2 and summary["tokens"] == 8 and summary["bits_per_image"] == 64
    assert 0 < summary["metrics"]["psnr"] < 60


@pytest.mark.slow
def test_paper_mnist_trains_every_variant_a_few_steps(tmp_path, capsys):
    """Every [compare.variants] of recipes/paper-mnist.toml (DAPS-NA, DAPS, FSQ, VQ-VAE) for 2 steps
    through ngkit compare (about 80 s: four start-ups, and DAPS decodes autoregressively)."""
    import json

    out = tmp_path / "mnist"
    args = ["compare", str(ROOT / "recipes" / "paper-mnist.toml"), "--steps", "2", "--out", str(out), *PAPER_MNIST_SHORT]
    assert main(args) == 0, capsys.readouterr().err
    table = {row["variant"]: row for row in json.loads((out / "results.json").read_text())["table"]}
    assert set(table) == {"daps-na", "daps", "fsq", "vqvae"}
    assert all(row["bits_per_image"] == 64 and row["step"] == 2 and 0 < row["psnr"] < 60 for row in table.values())


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


SHORT = ["--set", "run.eval_every=0", "--set", "eval.num_images=8", "--set", 'eval.metrics=["mse","usage"]']
EXPERIMENTS = sorted((ROOT / "recipes" / "experiments").glob("*.toml"))


def _compare_every_variant(recipe: Path, out: Path) -> list[dict]:
    import json

    assert main(["compare", str(recipe), "--steps", "2", "--seeds", "0", "--out", str(out), *SHORT]) == 0
    table = json.loads((out / "results.json").read_text())["table"]
    assert {row["variant"] for row in table} == set(load_recipe(recipe).compare.variants)
    assert all(row["step"] == 2 and row["mse"] == row["mse"] for row in table)  # ran, and a finite error
    return table


def test_compare_photos_runs_every_variant(tmp_path: Path, monkeypatch):
    """recipes/compare-photos.toml (the README's side-by-side): every method and variant trains
    2 steps in one compare at the same 128 bits per image."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    table = _compare_every_variant(ROOT / "recipes" / "compare-photos.toml", tmp_path / "cp")
    assert {row["bits_per_image"] for row in table} == {128}


@pytest.mark.slow
@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_recipe_trains_a_few_steps(path: Path, tmp_path: Path, capsys):
    """Each recipe of docs/experiments.md, its base settings, 2 steps as `ngkit run` trains them
    (slow: 12 start-ups; the default suite runs the shipped recipes, and these validate there)."""
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--set", "run.steps=2", *SHORT]) == 0, capsys.readouterr().err
    assert (out / "summary.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_recipe_trains_every_variant(path: Path, tmp_path: Path, monkeypatch):
    """Every variant of each experiment recipe, 2 steps (slow: ~90 variants in all)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _compare_every_variant(path, tmp_path / "cmp")
