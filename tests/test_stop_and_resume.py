"""Preemption, divergence and damaged checkpoints: real processes and signals, real corrupt files.

Signals are sent only once a run has logged a training step (never while it may be starting up)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

from child_processes import child_env, free_port
from ngkit.engine import checkpoint
from ngkit.engine.artifacts import read_jsonl
from ngkit.engine.train_loop import train
from ngkit.errors import NgkitError, TrainingError
from ngkit.recipe import parse_recipe
from tiny_recipe import tiny

TESTS = Path(__file__).parent


def slow_recipe(tmp_path: Path, steps: int = 400, seconds: float = 0.3) -> Path:
    raw = tiny(method={"name": "fsq-slow", "quantizer": {"name": "fsq", "levels": [4, 4]}, "seconds": seconds},
               run={"steps": steps, "log_every": 1, "eval_every": 0, "checkpoint_every": 0, "checkpoint_minutes": 0},
               eval={"metrics": ["mse"], "num_images": 8})
    path = tmp_path / "slow.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def start(args: list[str], **extra: str) -> subprocess.Popen:
    """``ngkit`` with the test plugins, in its own process."""
    return subprocess.Popen([sys.executable, str(TESTS / "fault_plugins.py"), *args], env=child_env(**extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_training(out: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r.get("kind") == "train" for r in read_jsonl(out / "metrics.jsonl")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before training: {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)
    proc.terminate()
    raise AssertionError("no training step logged in time")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)], ids=["sigterm", "sigint"])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, sig, code):
    out = tmp_path / "run"
    proc = start(["run", str(slow_recipe(tmp_path)), "--out", str(out), "--quiet"])
    wait_for_training(out, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert f"ngkit run --resume {out}" in err
    tag = checkpoint.latest_tag(out / "checkpoints")
    step = int(tag.split("-")[1])
    assert step >= 1 and not (out / "summary.json").exists()
    # resuming continues from there and trains the rest
    resumed = start(["run", "--resume", str(out), "--quiet", "--set", f"run.steps={step + 2}",
                     "--set", "method.seconds=0.0"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, step + 3))  # each step logged once


def test_a_second_signal_stops_at_once(tmp_path):
    out = tmp_path / "run"
    proc = start(["run", str(slow_recipe(tmp_path, seconds=3.0)), "--out", str(out), "--quiet"])
    wait_for_training(out, proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the step in flight sleeps 3 s
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    assert checkpoint.latest_tag(out / "checkpoints") is None


def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path):
    """Two processes as srun starts them; only rank 1 is signalled. Both save and exit 0."""
    port = str(free_port())
    out, recipe = tmp_path / "run", slow_recipe(tmp_path, seconds=0.2)
    procs = [start(["run", str(recipe), "--out", str(out), "--quiet"], SLURM_PROCID=str(r), SLURM_LOCALID=str(r),
                   SLURM_NTASKS="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for r in (0, 1)]
    wait_for_training(out, procs[0])
    procs[1].send_signal(signal.SIGTERM)
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
    tag = checkpoint.latest_tag(out / "checkpoints")
    assert tag is not None and {p.name for p in (out / "checkpoints" / tag).glob("rank-*.pt")} == {"rank-0.pt", "rank-1.pt"}


def run(tmp_path: Path, name: str = "run", resume: bool = False, **sections) -> Path:
    out = tmp_path / name
    train(parse_recipe(tiny(**sections), "tiny"), out, resume=resume, quiet=True)
    return out


EVERY_3 = {"steps": 9, "log_every": 1, "eval_every": 0, "checkpoint_every": 3, "checkpoint_minutes": 0}


@pytest.mark.parametrize("damage", ["truncated", "zero-length", "empty-folder", "no-marker"])
def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, damage):
    out = run(tmp_path, run={**EVERY_3, "steps": 6})
    newest = out / "checkpoints" / "step-00000006"
    state = newest / "mp_rank_00_model_states.pt"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "zero-length":
        state.write_bytes(b"")
    elif damage == "empty-folder":
        for f in newest.iterdir():
            f.unlink()
    else:
        (newest / checkpoint.MARKER).unlink()
    with pytest.warns(UserWarning, match="skipping checkpoint .*step-00000006"):
        train(parse_recipe(tiny(run=EVERY_3), "tiny"), out, resume=True, quiet=True)
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 10))  # 4..6 trained again, each logged once


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    out = run(tmp_path, run={**EVERY_3, "steps": 2, "checkpoint_every": 0})
    for tag in (out / "checkpoints").glob("step-*"):
        (tag / checkpoint.MARKER).unlink()
    with pytest.raises(NgkitError, match="no complete checkpoint"):
        train(parse_recipe(tiny(run=EVERY_3), "tiny"), out, resume=True, quiet=True)


def test_pruning_keeps_the_newest_complete_checkpoints(tmp_path):
    out = run(tmp_path, run={**EVERY_3, "keep_checkpoints": 2})
    ckpt = out / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000006", "step-00000009"]
    (ckpt / "step-00000012").mkdir()  # an incomplete newer one does not count
    checkpoint.prune(ckpt, keep=1)
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000009", "step-00000012"]


def test_metrics_after_the_checkpoint_are_dropped_and_a_torn_line_is_tolerated(tmp_path):
    out = run(tmp_path, run={**EVERY_3, "steps": 5})  # checkpoints at 3 and 5; logged 1..5
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-00000005")  # as if killed after logging step 5
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 6, "loss": 1.')  # a write torn by the kill
    train(parse_recipe(tiny(run={**EVERY_3, "steps": 6}), "tiny"), out, resume=True, quiet=True)
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "summary.json").read_text())["step"] == 6


@pytest.mark.parametrize("method", [{"name": "daps-na", "samples": 4},
                                    {"name": "fsq", "quantizer": {"name": "fsq", "levels": [4, 4]}}], ids=["daps-na", "fsq"])
def test_divergence_is_skipped_then_stops_naming_the_checkpoint(tmp_path, method):
    """lr = 1e10 blows the weights up: sampling and quantising NaN must not crash the step."""
    with pytest.raises(TrainingError, match="consecutive steps") as err:
        run(tmp_path, method=method, optim={"lr": 1e10, "max_skipped_steps": 3},
            run={**EVERY_3, "steps": 40, "checkpoint_every": 1})
    message = str(err.value)
    newest = checkpoint.latest_tag(tmp_path / "run" / "checkpoints")
    assert newest is not None and newest in message


def test_resume_refuses_a_recipe_or_another_out(tmp_path, capsys):
    from ngkit.cli.main import main

    out = run(tmp_path, run={**EVERY_3, "steps": 3})
    recipe = tmp_path / "other.toml"
    recipe.write_text(tomli_w.dumps(tiny()))
    assert main(["run", str(recipe), "--resume", str(out)]) == 2
    assert "cannot be given with it" in capsys.readouterr().err
    assert main(["run", "--resume", str(out), "--out", str(tmp_path / "elsewhere")]) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "elsewhere").exists()
