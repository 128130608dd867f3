"""The training loop end to end on a tiny recipe: files, reproducibility, resume, NaN handling,
atomic checkpoints."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

from ngkit import hookimpl
from ngkit.components import StepOutput
from ngkit.engine import checkpoint
from ngkit.engine.artifacts import read_jsonl
from ngkit.engine.train_loop import train
from ngkit.errors import NgkitError, TrainingError
from ngkit.plugins import temporary_plugin
from ngkit.recipe import parse_recipe
from tiny_recipe import tiny


def run(tmp_path: Path, name: str = "run", **sections) -> tuple[Path, dict]:
    out = tmp_path / name
    result = train(parse_recipe(tiny(**sections), "tiny"), out, quiet=True)
    return out, result.summary


def test_run_writes_every_artifact(tmp_path):
    out, summary = run(tmp_path)
    for name in ("recipe.toml", "metrics.jsonl", "summary.json", "reconstructions.png", "curves.png"):
        assert (out / name).is_file(), name
    assert checkpoint.latest_tag(out / "checkpoints") == "step-00000012"
    records = read_jsonl(out / "metrics.jsonl")
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [2, 4, 6, 8, 10, 12]
    for key in ("loss", "policy_loss", "gen_loss", "eta", "beta", "ess", "lr", "images_per_s"):
        assert all(key in r for r in train_records), key
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12] and all("test/psnr" in r for r in evals)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["metrics"]["psnr"] == summary["metrics"]["psnr"] and "mse" in saved["metrics"]
    assert saved["bits_per_image"] == 16 * 4  # 4x4 tokens of log2(16) bits
    # β follows the exponential schedule: 0.5 at step 0 -> 0.01 at the last step
    assert summary["beta"] == pytest.approx(0.01)
    # the run flushed denormals (the recipe's default) and gave the process its own setting back
    assert (torch.tensor([1e-39]) * torch.tensor([1.0])).item() != 0.0


def test_same_seed_same_run_on_cpu(tmp_path):
    a, _ = run(tmp_path, "a")
    b, _ = run(tmp_path, "b")
    la = [r["loss"] for r in read_jsonl(a / "metrics.jsonl") if r["kind"] == "train"]
    lb = [r["loss"] for r in read_jsonl(b / "metrics.jsonl") if r["kind"] == "train"]
    assert la == lb


def test_existing_run_needs_resume(tmp_path):
    run(tmp_path)
    with pytest.raises(NgkitError, match="--resume"):
        run(tmp_path)


def _weights(out: Path, tag: str) -> dict[str, torch.Tensor]:
    state = torch.load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
    return state["module"]


def test_resume_continues_from_the_checkpoint(tmp_path):
    out, _ = run(tmp_path, run={"steps": 6, "checkpoint_every": 0, "eval_every": 0})
    at6 = _weights(out, "step-00000006")
    recipe = parse_recipe(tiny(run={"steps": 12, "checkpoint_every": 0, "eval_every": 0}), "tiny")
    result = train(recipe, out, resume=True, quiet=True)
    assert result.summary["step"] == 12
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [2, 4, 6, 8, 10, 12]  # no step trained twice
    at12 = _weights(out, "step-00000012")
    # the learned step size carried over: its buffers were restored, then kept adapting
    key = next(k for k in at6 if k.endswith("log_eta"))
    assert not torch.equal(at6[key], at12[key])
    assert (out / "checkpoints" / "step-00000006").is_dir()


class NaNAfter(torch.nn.Module):
    """A method whose loss turns NaN from step ``bad_from`` on (tests the engine's guard)."""

    def __init__(self, *, latent, bad_from: int = 4, bad_until: int = 10**9) -> None:
        super().__init__()
        self.latent = latent
        self.w = torch.nn.Parameter(torch.ones(1))
        self.bad_from, self.bad_until = bad_from, bad_until

    def forward(self, x, step):
        loss = (self.w * x.mean()) ** 2
        if self.bad_from <= step < self.bad_until:
            loss = loss * float("nan")
        return StepOutput(loss, {"loss": float(loss.detach())})

    def after_step(self, step):
        return {}

    def encode(self, x):
        return torch.zeros(x.shape[0], self.latent.tokens, dtype=torch.long)

    def decode(self, z):
        return torch.zeros(z.shape[0], 1, 8, 8)


nan_plugin = types.SimpleNamespace(register_methods=hookimpl(lambda register: register("nan-after", NaNAfter)))


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    with temporary_plugin(nan_plugin, "nan_plugin"):
        out, summary = run(tmp_path, method={"name": "nan-after", "bad_from": 3, "bad_until": 6})
    assert summary["skipped_steps"] == 3
    assert all(torch.isfinite(v).all() for v in _weights(out, "step-00000012").values())


def test_too_many_non_finite_steps_stop_the_run_and_keep_the_checkpoint(tmp_path):
    raw = {"method": {"name": "nan-after", "bad_from": 8}, "optim": {"max_skipped_steps": 2}}
    with temporary_plugin(nan_plugin, "nan_plugin"):
        with pytest.raises(TrainingError, match="consecutive steps"):
            run(tmp_path, **raw)
    ckpt = tmp_path / "run" / "checkpoints"
    assert checkpoint.latest_tag(ckpt) == "step-00000006"
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "run", "step-00000006").values())


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    out, _ = run(tmp_path, run={"steps": 6, "checkpoint_every": 0, "eval_every": 0})
    ckpt = out / "checkpoints"
    before = (ckpt / "latest").read_text()

    class Engine:
        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            (Path(save_dir) / tag).mkdir()
            (Path(save_dir) / tag / "partial.pt").write_bytes(b"half")
            raise OSError("disk full")

    with pytest.raises(OSError):
        checkpoint.save(Engine(), ckpt, 7, {}, {}, rank=0, world_size=1, keep=3)
    assert (ckpt / "latest").read_text() == before
    assert checkpoint.latest_tag(ckpt) == "step-00000006"
    assert not (ckpt / "step-00000007").exists()


def test_a_time_budget_ends_the_run_at_its_first_step_past_it(tmp_path):
    out, summary = run(tmp_path, run={"steps": 100_000, "seconds": 1.0, "log_every": 1000, "eval_every": 1000,
                                      "checkpoint_every": 0})
    assert summary["stopped_by"] == "time" and 1 <= summary["step"] < 100_000
    assert summary["train_seconds"] >= 1.0
    records = read_jsonl(out / "metrics.jsonl")
    # The last step is logged, evaluated and checkpointed as the end of a run, not as a stop.
    assert [r["step"] for r in records if r["kind"] == "train"][-1] == summary["step"]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [summary["step"]]
    assert checkpoint.latest_tag(out / "checkpoints") == checkpoint.step_tag(summary["step"])
    _, full = run(tmp_path, "by-steps")
    assert full["stopped_by"] == "steps" and full["step"] == 12
