"""``ngkit encode``: a dataset split's codes and labels in shards, resumable, split across ranks, and
decoding to exactly what ``ngkit eval`` reconstructs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ngkit
from ngkit import data
from ngkit.cli.main import main
from ngkit.engine.evaluate import evaluate
from ngkit.engine.load import load_run
from ngkit.engine.train_loop import train
from ngkit.export import export
from ngkit.recipe import parse_recipe
from ngkit_plugins.embedded_data import Digits
from child_processes import child_env, free_port
from tiny_recipe import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = {"run": {"steps": 4, "eval_every": 0, "checkpoint_every": 0}, "eval": {"metrics": ["mse"], "num_images": 16}}
TEST_IMAGES = 300  # the digits test split


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("encode") / "run"
    train(parse_recipe(tiny(**SHORT), "tiny"), out, quiet=True)
    export(out, out / "export")
    return out


def read_shards(out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    shards = [load_file(p) for p in sorted(out.glob("shard-*.safetensors"))]
    return torch.cat([s["codes"] for s in shards]), torch.cat([s["labels"] for s in shards])


def encode(*args: str) -> int:
    return main(["encode", *args, "--quiet"])


def test_codes_and_labels_decode_to_what_ngkit_eval_reconstructs(run_dir, tmp_path, capsys):
    out = tmp_path / "codes"
    assert encode(str(run_dir), "--split", "test", "--out", str(out), "--batch-size", "16", "--shard-size", "128") == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors",
    ]
    codes, labels = read_shards(out)
    assert codes.shape == (TEST_IMAGES, 16) and codes.dtype == torch.int16
    assert labels.tolist() == Digits().labels["test"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["labels"] and meta["split"] == "test" and meta["dataset"] == {"name": "digits"}

    # what `ngkit eval` computes: the DeepSpeed-loaded model over the test split, batch by batch
    loaded = load_run(run_dir)
    dataset = loaded.built.dataset
    result = evaluate(loaded.engine.module, dataset, {}, num_images=TEST_IMAGES, batch_size=16, beta=0.0,
                      device=torch.device("cpu"), keep=TEST_IMAGES)
    tok = ngkit.load(run_dir / "export")
    decoded = torch.cat(list(tok.decode_batch(codes.split(16))))
    assert torch.equal(decoded, result.reconstructions)

    eval_args = ["--metric", "mse", "--batch-size", "16", "--num-images", str(TEST_IMAGES), "--json"]
    assert main(["eval", str(run_dir), *eval_args]) == 0
    record = json.loads(capsys.readouterr().out)
    mse = (decoded - result.images).pow(2).flatten(1).mean(1).mean().item()
    assert record["values"]["mse"] == pytest.approx(mse, rel=1e-6)


def test_an_export_encodes_a_named_dataset_as_npy(run_dir, tmp_path):
    out = tmp_path / "npy"
    assert encode(str(run_dir / "export"), "--data", "digits", "--split", "test", "--format", "npy",
                  "--out", str(out), "--shard-size", "200") == 0
    assert encode(str(run_dir / "export"), "--split", "test", "--out", str(tmp_path / "x")) == 2  # no dataset named
    codes = np.concatenate([np.load(out / f"shard-0000{i}.codes.npy") for i in (0, 1)])
    labels = np.concatenate([np.load(out / f"shard-0000{i}.labels.npy") for i in (0, 1)])
    assert codes.shape == (TEST_IMAGES, 16) and labels.tolist() == Digits().labels["test"]
    tok = ngkit.load(run_dir / "export")
    want = tok.encode(next(data.test_batches(Digits(), TEST_IMAGES, 0, 1, TEST_IMAGES)))
    assert np.array_equal(codes, want.numpy())


def test_a_rerun_resumes_and_refuses_other_settings(run_dir, tmp_path):
    out = tmp_path / "codes"
    args = [str(run_dir / "export"), "--data", "digits", "--split", "test", "--out", str(out), "--shard-size", "100"]
    assert encode(*args) == 0
    kept, lost = out / "shard-00000.safetensors", out / "shard-00001.safetensors"
    before, kept_mtime = lost.read_bytes(), kept.stat().st_mtime_ns
    lost.unlink()
    assert encode(*args) == 0
    assert lost.read_bytes() == before and kept.stat().st_mtime_ns == kept_mtime
    assert encode(*args[:-1], "50") == 2  # another shard size: not the same codes folder


def test_images_of_another_size_are_refused(run_dir, tmp_path, capsys):
    assert encode(str(run_dir / "export"), "--data", "photos", "--split", "test", "--out", str(tmp_path / "x")) == 2
    assert "has images [3, 32, 32] but the tokenizer takes [1, 8, 8]" in capsys.readouterr().err


def test_two_ranks_share_the_shards(run_dir, tmp_path):
    args = ["encode", str(run_dir / "export"), "--data", "digits", "--split", "test", "--shard-size", "64", "--quiet"]
    env = child_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "ngkit.cli.main", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    names = sorted(p.name for p in (tmp_path / "one").glob("shard-*"))
    assert len(names) == 5 and names == sorted(p.name for p in (tmp_path / "two").glob("shard-*"))
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
