"""A full disk while saving: one message (space in DIR, free and needed bytes, the newest complete
checkpoint), the partial temporary folder removed, exit 2; the previous checkpoint still resumes.
The writer is patched to fail as a full disk does (ENOSPC after a partial write)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import tomli_w
import torch

from ngkit.cli.main import main
from ngkit.engine import checkpoint
from ngkit.engine.artifacts import read_jsonl
from tiny_recipe import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = {"run": {"steps": 4, "log_every": 1, "eval_every": 0, "checkpoint_every": 2, "checkpoint_minutes": 0},
       "eval": {"metrics": ["mse"], "num_images": 16}}


def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "r.toml"
    path.write_text("# r.toml\n" + tomli_w.dumps(tiny(**RUN)))
    return path


def test_a_full_disk_while_writing_stops_the_run_clearly_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):  # type: ignore[no-untyped-def]
        if "step-00000004" in str(f):
            Path(f).write_bytes(b"\0" * 100)  # what a write cut short leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    assert main(["run", str(recipe(tmp_path)), "--out", str(out), "--quiet"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"could not be written for lack of space in {out / 'checkpoints'}" in err
    assert "bytes free, about" in err and f"newest complete checkpoint is {out / 'checkpoints' / 'step-00000002'}" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step-00000002"]

    monkeypatch.setattr(torch, "save", real_save)  # space freed: resume from step 2
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3, 4]


def test_torch_zip_writer_errors_count_as_a_full_disk():
    torn = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1234 vs 1200")
    assert checkpoint._caused_by_full_disk(torn)
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert checkpoint._caused_by_full_disk(wrapped)
    assert not checkpoint._caused_by_full_disk(RuntimeError("size mismatch"))


def test_too_little_free_space_is_found_before_writing(tmp_path, monkeypatch, capsys):
    real = checkpoint.shutil.disk_usage

    def nearly_full(path):  # type: ignore[no-untyped-def]
        usage = real(path)
        return usage._replace(free=1000)

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", nearly_full)
    out = tmp_path / "run"
    assert main(["run", str(recipe(tmp_path)), "--out", str(out), "--quiet"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "1000 bytes free" in err and "no complete checkpoint was saved yet" in err
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith((".tmp", "step-"))]


@pytest.fixture
def small_tmpfs(tmp_path):  # type: ignore[no-untyped-def]
    """A 300 KiB tmpfs (root only; skipped where it cannot be mounted): smaller than one checkpoint."""
    import subprocess

    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)  # lazily: the failed run may hold a file open


def test_a_real_full_disk_is_answered_the_same_way(small_tmpfs, tmp_path, monkeypatch, capsys):
    """On a real full filesystem torch's writer fails its own way; the free-space check is
    switched off so that the write itself meets the full disk."""
    monkeypatch.setattr(checkpoint, "needed_bytes", lambda ckpt_dir, engine: 0)
    out = small_tmpfs / "run"
    assert main(["run", str(recipe(tmp_path)), "--out", str(out), "--quiet"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "could not be written for lack of space" in err and "no complete checkpoint was saved yet" in err
    assert list((out / "checkpoints").iterdir()) == []
