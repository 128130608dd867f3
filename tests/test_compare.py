"""``ngkit compare``: variants merged over one recipe, every output file, one row per method."""

from __future__ import annotations

import csv
import json
import math

import tomli_w

from ngkit.cli.main import main
from ngkit.compare import CALIBRATION_STEPS, SECONDS_HEADROOM
from ngkit.recipe import parse_recipe, variant_raw
from tiny_recipe import tiny


def test_variant_replaces_a_renamed_component_and_merges_the_rest():
    base = tiny(method={"name": "daps-na", "samples": 4, "step_size": {"name": "ess", "target": 0.25}})
    same = variant_raw(base, {"method": {"step_size": {"target": 0.5}}})
    assert same["method"] == {"name": "daps-na", "samples": 4, "step_size": {"name": "ess", "target": 0.5}}
    renamed = variant_raw(base, {"method": {"step_size": {"name": "kl", "bound": 1.0}}})
    assert renamed["method"]["step_size"] == {"name": "kl", "bound": 1.0}
    other = variant_raw(base, {"method": {"name": "fsq"}, "model": {"encoder": {"depth": 2}}})
    assert other["method"] == {"name": "fsq"}
    assert other["model"]["encoder"]["depth"] == 2 and other["model"]["encoder"]["width"] == 32


def test_bad_variant_is_reported_at_validation():
    raw = tiny(compare={"variants": {"broken": {"method": {"name": "fsq", "samples": 3}}}})
    try:
        parse_recipe(raw, "r.toml")
    except Exception as exc:  # RecipeError
        assert "[compare.variants.broken]" in str(exc) and "samples" in str(exc)
    else:
        raise AssertionError("a variant with a bad option must not validate")


def test_compare_writes_table_figures_and_one_row_per_method(tmp_path, capsys):
    raw = tiny(
        run={"steps": 3, "eval_every": 0, "checkpoint_every": 0, "log_every": 1},
        eval={"metrics": ["mse", "psnr", "usage"], "num_images": 16},
        compare={"variants": {
            "daps-na": {},
            "fsq": {"method": {"name": "fsq", "quantizer": {"name": "fsq", "levels": [4, 4]}}},
        }},
    )
    recipe = tmp_path / "cmp.toml"
    recipe.write_text(tomli_w.dumps(raw))
    out = tmp_path / "cmp"
    assert main(["compare", str(recipe), "--methods", "daps-na,fsq,vqvae", "--seeds", "2", "--out", str(out)]) == 0
    for name in ("results.md", "results.csv", "results.json", "curves.png", "reconstructions.png"):
        assert (out / name).is_file(), name
    table = json.loads((out / "results.json").read_text())["table"]
    assert [row["variant"] for row in table] == ["daps-na", "fsq", "vqvae"]
    assert all(row["seeds"] == 2 and "psnr" in row and "psnr_std" in row for row in table)
    assert all(row["bits_per_image"] == 64 for row in table)  # same bits for every method
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["seed"] for r in rows} == {"0", "1"}
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == 4 and "±" in md  # header + 3 methods


def test_compare_by_seconds_gives_every_run_the_same_wall_clock(tmp_path):
    fsq = {"method": {"name": "fsq", "quantizer": {"name": "fsq", "levels": [4, 4]}}}
    raw = tiny(run={"steps": 3, "eval_every": 0, "checkpoint_every": 0}, eval={"metrics": ["mse"], "num_images": 8},
               compare={"variants": {"daps-na": {}, "fsq": fsq}})
    recipe = tmp_path / "cmp.toml"
    recipe.write_text(tomli_w.dumps(raw))
    out = tmp_path / "cmp"
    assert main(["compare", str(recipe), "--methods", "fsq", "--seconds", "1.5", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert "1.5 s of training" in data["budget"]
    for run in data["runs"]:
        label = run["variant"]
        # schedules span the calibration's prediction for 1.5 s with headroom: the difference of a
        # 5- and a 25-step run per step, so start-up costs cancel ...
        timed = []
        for steps in CALIBRATION_STEPS:
            calibration = json.loads((out / "calibration" / label / f"steps-{steps}" / "summary.json").read_text())
            assert calibration["step"] == steps
            timed.append(calibration["train_seconds"])
        per_step = (timed[1] - timed[0]) / (CALIBRATION_STEPS[1] - CALIBRATION_STEPS[0])
        per_step = per_step if per_step > 0 else timed[1] / CALIBRATION_STEPS[1]
        assert data["steps"][label] == max(1, math.ceil(SECONDS_HEADROOM * 1.5 / per_step))
        # ... and the run itself stops at its first step past 1.5 s, unless its steps ran out first
        if run["stopped_by"] == "time":
            assert run["step"] < data["steps"][label] and run["train_seconds"] >= 1.5
        else:
            assert run["step"] == data["steps"][label]
        assert run["train_seconds"] > 0
    md = (out / "results.md").read_text()
    assert "steps reached" in md and "train s" in md


def test_compare_rejects_a_budget_of_no_seconds(tmp_path, capsys):
    recipe = tmp_path / "cmp.toml"
    recipe.write_text(tomli_w.dumps(tiny()))
    assert main(["compare", str(recipe), "--seconds", "0", "--out", str(tmp_path / "o")]) == 2
    assert "positive number of seconds" in capsys.readouterr().err


def test_compare_warns_when_a_run_runs_out_of_steps_before_its_seconds(tmp_path, capsys, monkeypatch):
    """A calibration that overestimates a step (here: 100 s) lays out too few steps; the run then
    ends by steps long before S, and compare says that row is not at equal wall clock."""
    import ngkit.compare as compare_module

    fsq = {"method": {"name": "fsq", "quantizer": {"name": "fsq", "levels": [4, 4]}}}
    raw = tiny(run={"steps": 3, "eval_every": 0, "checkpoint_every": 0}, eval={"metrics": ["mse"], "num_images": 8},
               compare={"variants": {"fsq": fsq}, "seeds": [0]})
    recipe = tmp_path / "cmp.toml"
    recipe.write_text(tomli_w.dumps(raw))
    monkeypatch.setattr(compare_module, "_calibrate", lambda variant, source, out: 100.0)
    out = tmp_path / "cmp"
    assert main(["compare", str(recipe), "--seconds", "30", "--out", str(out)]) == 0
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert run["step"] == 1 and run["stopped_by"] == "steps" and run["train_seconds"] < 30
    assert "ran out of its 1 steps" in " ".join(capsys.readouterr().err.split())
