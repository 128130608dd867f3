"""The command line end to end: plugins listing, eval with protocol, reference stats, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ngkit.cli.main import main
from ngkit.engine.train_loop import train
from ngkit.recipe import parse_recipe
from tiny_recipe import tiny


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    train(parse_recipe(tiny(run={"steps": 4, "eval_every": 0, "checkpoint_every": 0}), "tiny"), out, quiet=True)
    return out


def test_plugins_json_lists_builtins_with_what_they_provide(capsys):
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["daps_method"]["provides"] == {"methods": ["daps", "daps-na"]}
    assert rows["conv_decoder"]["package"] == "ngkit" and rows["conv_decoder"]["builtin"]


def test_eval_writes_values_with_their_protocol(run_dir, trusted, capsys):
    code = main(["eval", str(run_dir), "--metric", "psnr", "--metric", "usage", "--metric", "fid",
                 "--num-images", "8", "--json"])
    assert code == 0, capsys.readouterr().err
    record = json.loads(capsys.readouterr().out)
    assert record["checkpoint"] == "step-00000004" and record["num_images"] == 8
    assert {"psnr", "code_usage", "fid"} <= set(record["values"])
    assert record["protocol"]["fid"]["weights_sha256"] == hashlib.sha256(trusted.read_bytes()).hexdigest()
    written = json.loads(Path(record["written_to"]).read_text())
    assert written["values"] == record["values"] and "versions" in written


def test_eval_without_inception_weights_says_how_to_get_them(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NGKIT_CACHE", str(tmp_path))
    monkeypatch.delenv("NGKIT_INCEPTION_WEIGHTS", raising=False)
    assert main(["eval", str(run_dir), "--metric", "fid", "--num-images", "4"]) == 2
    err = capsys.readouterr().err
    assert "--inception-weights" in err and "NGKIT_INCEPTION_WEIGHTS" in err and "Traceback" not in err


def test_eval_stats_then_fid_against_them(run_dir, trusted, tmp_path, capsys):
    stats = tmp_path / "digits.npz"
    assert main(["eval", "stats", "digits", "--out", str(stats), "--num-images", "16"]) == 0
    with np.load(stats) as f:
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048) and int(f["n"]) == 16
    code = main(["eval", str(run_dir), "--metric", "fid", "--reference-stats", str(stats), "--num-images", "8", "--json"])
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert "reference" in json.dumps(record["protocol"]["fid"]).lower()


def test_eval_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--metric", "psnr"]) == 2
    assert "neither an ngkit run directory" in capsys.readouterr().err


def test_resume_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "not an ngkit run directory" in capsys.readouterr().err
