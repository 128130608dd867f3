"""The multi-rank path: two CPU processes under torchrun (gloo), the same code as one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from tiny_recipe import tiny


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path: Path, raw: dict, nproc: int = 2) -> tuple[subprocess.CompletedProcess, Path]:
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tomli_w.dumps(raw))
    out = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "ngkit.cli.main", "run", str(recipe), "--out", str(out), "--quiet"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900), out


@pytest.mark.parametrize(
    "stage, clip", [(0, "agc"), pytest.param(3, "norm", marks=pytest.mark.slow)], ids=["zero0", "zero3"]
)
def test_two_ranks_train_and_evaluate(tmp_path, stage, clip):
    raw = tiny(distributed={"zero_stage": stage}, optim={"clip": clip}, run={"steps": 6, "eval_every": 3, "checkpoint_every": 3})
    proc, out = torchrun(tmp_path, raw)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == stage
    assert summary["metrics"]["psnr"] > 0
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6]
    assert (out / "checkpoints" / "step-00000006").is_dir()
