"""One live run per run directory: a second run is refused naming the holder; a stale lock is
taken over; only rank 0 locks; the lock goes when the run ends, however it ends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from ngkit.cli.main import main
from ngkit.engine import lock
from ngkit.engine.checkpoint import LOCK_NAME
from ngkit.errors import NgkitError
from tiny_recipe import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = {"run": {"steps": 2, "eval_every": 0, "checkpoint_every": 0}, "eval": {"metrics": ["mse"], "num_images": 16}}


def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "r.toml"
    path.write_text("# r.toml\n" + tomli_w.dumps(tiny(**SHORT)))
    return path


def held_by(run_dir: Path, pid: int, host: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"pid": pid, "host": host or socket.gethostname(), "since": "2026-01-01 00:00:00"}
    (run_dir / LOCK_NAME).write_text(json.dumps(info))


def test_a_second_run_on_a_live_run_directory_is_refused(tmp_path, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        held_by(tmp_path / "run", sleeper.pid)
        assert main(["run", str(recipe(tmp_path)), "--out", str(tmp_path / "run"), "--quiet"]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"PID {sleeper.pid} on host {socket.gethostname()}" in err
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
        assert main(["run", "--resume", str(tmp_path / "run"), "--quiet"]) == 2  # no recipe.toml: refused anyway
    finally:
        sleeper.terminate()
        sleeper.wait()


def test_a_lock_held_from_another_host_is_refused(tmp_path):
    held_by(tmp_path / "run", 1, host="some-other-node")
    with pytest.raises(NgkitError, match="PID 1 on host some-other-node"):
        lock.acquire(tmp_path / "run")


def test_a_stale_lock_is_taken_over_with_a_warning_and_released_at_the_end(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    held_by(tmp_path / "run", gone.pid)
    with pytest.warns(UserWarning, match=f"taking over the lock of ngkit process {gone.pid}"):
        assert main(["run", str(recipe(tmp_path)), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert (tmp_path / "run" / "summary.json").exists()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_another_process_sees_the_lock_until_it_is_released_even_by_an_error(tmp_path):
    run_dir = tmp_path / "run"
    code = f"from pathlib import Path; from ngkit.engine import lock; lock.acquire(Path({str(run_dir)!r}))"
    with pytest.raises(RuntimeError, match="inside the run"):
        with lock.holding(run_dir, rank=0):
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
            assert proc.returncode != 0 and f"PID {os.getpid()}" in proc.stderr
            raise RuntimeError("inside the run")
    assert not run_dir.exists()  # created for the run and still empty: removed with the lock


def test_only_rank_zero_locks(tmp_path):
    with lock.holding(tmp_path / "run", rank=1):
        assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_ctrl_c_during_the_final_evaluation_exits_130_naming_the_checkpoint(tmp_path, monkeypatch, capsys):
    import ngkit.engine.train_loop as train_loop

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt  # what SIGINT raises once the training steps' handler is gone

    monkeypatch.setattr(train_loop, "evaluate", interrupted)  # eval_every = 0: only the final one
    out = tmp_path / "run"
    assert main(["run", str(recipe(tmp_path)), "--out", str(out), "--quiet"]) == 130
    err = " ".join(capsys.readouterr().err.split())
    assert f"interrupted (SIGINT); the newest complete checkpoint is {out / 'checkpoints' / 'step-00000002'}" in err
    assert not (out / LOCK_NAME).exists()
