"""Priors end to end on digits with a tiny budget: tokenizer -> codes -> prior trained by the
engine -> samples -> class-consistency score; ``ngkit sample``; exact resume; input errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch

from ngkit.cli.main import main
from ngkit.engine.load import read_model_state
from ngkit.engine.train_loop import train
from ngkit.errors import RecipeError
from ngkit.priors.codes import CodeDataset, check_precision, unpack
from ngkit.priors.recipe import parse_prior_recipe
from ngkit.priors.run import load_prior_run
from ngkit.recipe import parse_recipe
from ngkit.tokenizer import load
from ngkit_plugins.embedded_data import Digits
from tiny_recipe import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = {"run": {"steps": 4, "eval_every": 0, "checkpoint_every": 0}, "eval": {"metrics": ["mse"], "num_images": 16}}


def prior_raw(tokenizer: Path, name: str = "autoregressive", **prior) -> dict:
    return {
        "prior": {"name": name, "tokenizer": str(tokenizer), "width": 32, "depth": 1, "heads": 2, **prior},
        "data": {"name": "digits", "batch_size": 16},
        "run": {"steps": 6, "seed": 0, "log_every": 2, "checkpoint_every": 3},
        "eval": {"metrics": ["usage", "distinct"], "num_images": 20, "batch_size": 10},
    }


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prior") / "tokenizer"
    train(parse_recipe(tiny(**TOKENIZER), "tiny"), out, quiet=True)
    return out


@pytest.fixture(scope="module")
def prior_run(tokenizer_run: Path) -> Path:
    recipe = tokenizer_run.parent / "ar.toml"
    recipe.write_text(tomli_w.dumps(prior_raw(tokenizer_run)))
    out = tokenizer_run.parent / "ar"
    assert main(["prior", "train", str(recipe), "--out", str(out), "--quiet", "--samples-per-class", "3"]) == 0
    return out


def test_codes_are_packed_exactly_and_held_out_images_are_real(tokenizer_run: Path) -> None:
    tok, digits = load(tokenizer_run), Digits()
    codes = CodeDataset(tok, digits)
    assert codes.classes == 10 and codes.spec.shape == digits.spec.shape
    assert torch.equal(codes.codes, tok.encode(digits.train_set))
    examples = list(codes.train(seed=0, epoch=0, shard=0, num_shards=1))
    index = int(examples[0].name.split()[-1])
    z, y = unpack(examples[0].load()[None], tok.latent.tokens)
    assert torch.equal(z[0], codes.codes[index]) and y.item() == digits.labels["train"][index]
    held_out = next(iter(codes.test(shard=0, num_shards=1, limit=1)))
    assert torch.equal(held_out, digits.test_set[0])
    assert codes.emitted().tolist() == [(codes.codes == c).any().item() for c in range(tok.latent.codes)]


def test_end_to_end_tokenizer_codes_prior_samples_score(prior_run: Path, tokenizer_run: Path) -> None:
    summary = json.loads((prior_run / "summary.json").read_text())
    assert summary["recipe"] == "autoregressive" and summary["step"] == 6
    assert set(summary["metrics"]) >= {"distinct", "code_usage"}
    records = [json.loads(line) for line in (prior_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    for name in ("curves.png", "reconstructions.png", "generation.png", "generation.npz", "checkpoints/step-00000006"):
        assert (prior_run / name).exists(), name
    saved = (prior_run / "recipe.toml").read_text()
    assert f'tokenizer = "{tokenizer_run.resolve()}"' in saved and "classes = 10" in saved

    generation = json.loads((prior_run / "generation.json").read_text())
    assert generation["samples"] == 30
    assert 0.0 <= generation["class_consistency"] <= 1.0
    assert 0.0 < generation["distinct_fraction"] <= 1.0
    assert generation["classifier_test_accuracy"] > 0.8  # the classifier itself works on real digits
    npz = np.load(prior_run / "generation.npz")
    assert npz["codes"].shape == (30, 16) and npz["images"].shape == (30, 1, 8, 8)
    assert sorted(np.bincount(npz["labels"]).tolist()) == [3] * 10
    assert npz["codes"].max() < 16 and npz["images"].min() >= 0 and npz["images"].max() <= 1
    # the tokenizer is frozen: it is neither in the checkpoint nor changed by training
    module, _ = read_model_state(prior_run, "step-00000006")
    assert module and all(key.startswith("prior.") for key in module)


def test_masked_codes_are_those_the_tokenizer_never_emitted(prior_run: Path, tokenizer_run: Path) -> None:
    run = load_prior_run(prior_run)
    emitted = CodeDataset(load(tokenizer_run), Digits()).emitted()
    assert torch.equal(run.prior.allowed, emitted)
    codes, _ = run.sample(torch.arange(10).repeat(20), seed=3)
    assert emitted[codes].all()


def test_sample_command_writes_grid_npz_and_scores(prior_run: Path, tmp_path: Path) -> None:
    args = ["sample", str(prior_run), "--num", "4", "--label", "3", "--guidance", "2", "--seed", "1"]
    assert main([*args, "--out", str(tmp_path / "a"), "--score"]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert main([*args[:-1], "2", "--out", str(tmp_path / "c")]) == 0
    a, b, c = (np.load(tmp_path / f"{x}.npz") for x in "abc")
    assert (a["labels"] == 3).all() and a["codes"].shape == (4, 16)
    assert np.array_equal(a["codes"], b["codes"]) and not np.array_equal(a["codes"], c["codes"])
    assert (tmp_path / "a.png").is_file()
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["guidance"] == 2.0 and record["seed"] == 1 and "class_consistency" in record
    assert main(["sample", str(prior_run), "--label", "10"]) == 2
    assert main(["sample", str(prior_run), "--num", "1"]) == 0
    assert (prior_run / "samples" / "label-all-g1-seed0.npz").is_file()


def test_resume_continues_exactly(prior_run: Path, tmp_path: Path) -> None:
    """Drop the last checkpoint and resume from step 3: the same weights as the whole run."""
    copy = tmp_path / "copy"
    shutil.copytree(prior_run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-00000006")
    assert main(["prior", "train", "--resume", str(copy), "--quiet", "--samples-per-class", "0"]) == 0
    whole, _ = read_model_state(prior_run, "step-00000006")
    resumed, _ = read_model_state(copy, "step-00000006")
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_discrete_flow_trains_with_the_engine(tokenizer_run: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "flow.toml"
    raw = prior_raw(tokenizer_run, "discrete-flow", steps=4, source="mask")
    raw["run"].update(steps=4, checkpoint_every=0)
    recipe.write_text(tomli_w.dumps(raw))
    assert main(["prior", "train", str(recipe), "--out", str(tmp_path / "flow"), "--quiet", "--samples-per-class", "2"]) == 0
    generation = json.loads((tmp_path / "flow" / "generation.json").read_text())
    assert generation["samples"] == 20 and 0 <= generation["class_consistency"] <= 1


def test_recipe_errors_are_listed_together(tokenizer_run: Path) -> None:
    raw = prior_raw(tokenizer_run, widht=3)
    raw["run"]["stepz"] = 3
    raw["eval"]["metrics"] = ["distinct", "nope"]
    with pytest.raises(RecipeError) as err:
        parse_prior_recipe(raw, "bad.toml")
    text = str(err.value)
    assert '[prior.widht] unknown option for priors "autoregressive"; did you mean "width"?' in text
    assert "[run.stepz] unknown key; did you mean \"steps\"?" in text
    assert '[eval.metrics.nope] unknown metric name "nope"' in text
    with pytest.raises(RecipeError, match=r"\[model\]/\[method\]"):
        parse_prior_recipe({**raw, "model": {}}, "bad.toml")
    with pytest.raises(RecipeError, match='use precision = "fp32"'):
        check_precision("bf16", 1024, 10, "x.toml")
    check_precision("bf16", 256, 10, "x.toml")


def test_eval_of_a_prior_run_is_a_generation_evaluation(prior_run: Path, trusted: Path, capsys) -> None:
    """``ngkit eval PRIOR_RUN --metric fid --mode generation``: samples vs held-out images, with
    the protocol saying so; reconstruction metrics and an unlabelled FID mode are refused."""
    args = ["eval", str(prior_run), "--num-images", "20", "--batch-size", "10", "--json"]
    assert main([*args, "--metric", "fid", "--metric", "distinct", "--mode", "generation"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["num_images"] == 20 and np.isfinite(record["values"]["fid"]) and record["values"]["fid"] > 0
    assert record["protocol"]["fid"]["mode"].startswith("generation FID: N samples of a prior vs N held-out images")
    assert 0 < record["values"]["distinct"] <= 1
    assert main([*args]) == 0  # the default metrics of a prior run: usage and distinct
    assert set(json.loads(capsys.readouterr().out)["values"]) >= {"distinct", "code_usage"}
    assert main([*args, "--metric", "psnr"]) == 2
    assert "mean nothing" in capsys.readouterr().err
    assert main([*args, "--metric", "fid"]) == 2
    assert "--mode generation" in capsys.readouterr().err
