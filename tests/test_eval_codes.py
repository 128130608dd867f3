"""``ngkit eval --codes sample``: one z ~ q(z|x) per image, seeded, beside the argmax codes."""

from __future__ import annotations

import json
from pathlib import Path

from ngkit.cli.main import main
from ngkit.engine.train_loop import train
from ngkit.recipe import parse_recipe
from tiny_recipe import tiny


def _run(tmp_path_factory, **method: object) -> Path:
    out = tmp_path_factory.mktemp("codes") / "run"
    sections = {"method": method} if method else {}
    train(parse_recipe(tiny(run={"steps": 3, "eval_every": 0, "checkpoint_every": 0}, **sections), "tiny"), out,
          quiet=True)
    return out


def _eval(run_dir: Path, capsys, *extra: str) -> dict:
    assert main(["eval", str(run_dir), "--metric", "psnr", "--metric", "usage", "--num-images", "32", "--json",
                 *extra]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_sampled_codes_are_seeded_and_differ_from_argmax(tmp_path_factory, capsys) -> None:
    run_dir = _run(tmp_path_factory)
    argmax = _eval(run_dir, capsys)
    sampled = _eval(run_dir, capsys, "--codes", "sample")
    again = _eval(run_dir, capsys, "--codes", "sample")
    assert argmax["codes"] == "argmax" and sampled["codes"] == "sample"
    assert sampled["values"] == again["values"]  # the same command gives the same numbers
    # After 3 steps q(z|x) is near uniform over 16 codes: samples touch more codes than argmax.
    assert sampled["values"]["code_usage"] > argmax["values"]["code_usage"]


def test_sampled_codes_need_a_categorical_encoder(tmp_path_factory, capsys) -> None:
    run_dir = _run(tmp_path_factory, name="fsq", quantizer={"name": "fsq", "levels": [4, 4]})
    assert main(["eval", str(run_dir), "--metric", "psnr", "--num-images", "8", "--codes", "sample"]) == 2
    assert "has no sampled codes" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--codes", "nearest"]) == 2
    assert "--codes must be argmax or sample" in capsys.readouterr().err
