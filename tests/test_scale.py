"""The scale path on CPU: two ranks (gloo) equal one rank at every ZeRO stage; clipping and the
non-finite guard act at every stage; η stays identical across ranks while sampling noise differs;
stop + resume continues exactly; the ImageNet-256 recipe itself runs on two ranks.

All two-rank trainings run in one ``torchrun`` (``rank_worker.py``), once per module; each test
compares their results with one-rank runs trained here, in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from child_processes import child_env, free_port
from fault_plugins import fault_plugin
from image_sets import write_imagefolder, write_parquet
from ngkit.engine import checkpoint
from ngkit.engine.artifacts import read_jsonl
from ngkit.engine.train_loop import train
from ngkit.plugins import temporary_plugin
from ngkit.recipe import parse_recipe
from tiny_recipe import tiny

TESTS = Path(__file__).parent
REPO = TESTS.parent
STAGES = [0, 1, 2, 3]
TOL = 1e-5  # two ranks sum gradients in another order than one rank: float32 rounding only


def fsq(stage: int, batch: int, clip: str = "none", clip_value: float = 1.0, poison: tuple[int, ...] = (),
        poison_rank: int = 0, steps: int = 5) -> dict:
    """A deterministic method (FSQ: no sampling noise) on digits, so one rank and two can agree."""
    raw = tiny(
        method={"name": "fsq-poisoned", "quantizer": {"name": "fsq", "levels": [4, 4]},
                "poison_steps": list(poison), "poison_rank": poison_rank},
        distributed={"zero_stage": stage}, optim={"clip": clip, "clip_value": clip_value},
        data={"batch_size": batch},
        run={"steps": steps, "log_every": 1, "eval_every": 0, "checkpoint_every": 0, "checkpoint_minutes": 0},
        eval={"metrics": ["mse"], "num_images": 16},
    )
    raw["model"]["decoder"]["batch_norm"] = False  # batch statistics are per rank (no SyncBatchNorm on CPU)
    return raw


# (name, clip, clip_value, poisoned step, rank poisoned in the two-rank run); the values bind (see
# test_clipping_binds)
CLIPPED = [("agc", "agc", 0.01, 3, 1), ("norm", "norm", 0.05, 2, 0)]


def daps_hf(data_dir: Path, steps: int, stage: int = 2, workers: int = 2) -> dict:
    """Stochastic DAPS-NA with its per-rank state on (trust-region anchor, dead-code counts) on a
    3-shard parquet set; β's schedule length fixed so that a short run followed by --resume
    follows the same schedule as one long run."""
    return tiny(
        method={"name": "daps-na", "samples": 4, "trust_region": 0.05, "split_dead_codes": 2, "split_below": 0.9},
        data={"name": "hf", "path": "parquet", "data_dir": str(data_dir), "image_size": 8, "batch_size": 4,
              "workers": workers, "shuffle_buffer": 8},
        distributed={"zero_stage": stage},
        schedule={"beta": {"name": "exponential", "start": 0.5, "end": 0.01, "steps": 6}},
        run={"steps": steps, "log_every": 1, "eval_every": 0, "checkpoint_every": 0, "checkpoint_minutes": 0},
        eval={"metrics": ["mse", "psnr"], "num_images": 6, "batch_size": 2},
    )


def imagenet_argv(recipe: Path, out: Path, data_dir: Path) -> list[str]:
    """recipes/imagenet256.toml with data and size overridden, every other key as shipped."""
    sets = {
        "data.path": '"imagefolder"', "data.data_dir": f'"{data_dir}"', "data.image_size": "32",
        "data.batch_size": "2", "model.codes": "16", "model.encoder.width": "32", "model.decoder.width": "16",
        "run.steps": "3", "run.log_every": "1", "eval.metrics": '["mse", "psnr", "usage"]',
        "eval.num_images": "4", "eval.batch_size": "2",
    }
    argv = ["run", str(recipe), "--out", str(out), "--quiet"]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    return argv


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two-ranks")
    parquet = write_parquet(root / "parquet", train=40, shards=3)
    folder = write_imagefolder(root / "imagefolder", train=12, validation=4)
    jobs = []
    for stage in STAGES:
        for name, clip, value, step, rank in CLIPPED:
            jobs.append({"out": str(root / f"{name}-z{stage}"),
                         "recipe": fsq(stage, 8, clip, value, (step,), rank)})
    probe = tiny(method={"name": "daps-probed", "samples": 4, "probe": str(root / "probe-{rank}.jsonl")},
                 distributed={"zero_stage": 1}, run={"steps": 4, "checkpoint_minutes": 0})
    jobs.append({"out": str(root / "probe"), "recipe": probe})
    jobs.append({"out": str(root / "hf-full"), "recipe": daps_hf(parquet, 6)})
    jobs.append({"out": str(root / "hf-part"), "recipe": daps_hf(parquet, 3)})
    jobs.append({"out": str(root / "hf-part"), "recipe": daps_hf(parquet, 6), "resume": True})
    jobs.append({"out": str(root / "imagenet"),
                 "argv": imagenet_argv(REPO / "recipes" / "imagenet256.toml", root / "imagenet", folder)})
    for i, job in enumerate(jobs):
        job["status"] = str(root / f"job{i}")
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = child_env(PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(TESTS / "rank_worker.py"), str(root / "jobs.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    for i, job in enumerate(jobs):
        for rank in (0, 1):
            status = Path(f"{job['status']}.rank{rank}.json")
            assert status.exists(), f"job {i} never finished on rank {rank}:\n{proc.stderr[-3000:]}"
            outcome = json.loads(status.read_text())
            assert outcome["ok"], f"job {i} ({job['out']}) failed on rank {rank}:\n{outcome['trace']}"
            job.setdefault("outcomes", []).append(outcome)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (root / "jobs.json").write_text(json.dumps(jobs))
    return root


def one_rank(tmp_path: Path, name: str, raw: dict, resume: bool = False) -> Path:
    out = tmp_path / name
    with temporary_plugin(fault_plugin, "fault_plugins"):
        train(parse_recipe(raw, name), out, resume=resume, quiet=True)
    return out


def final_params(out: Path) -> dict[str, torch.Tensor]:
    """The trained parameters, consolidated from any ZeRO stage."""
    ckpt = out / "checkpoints"
    tag = checkpoint.latest_tag(ckpt)
    stage = json.loads((out / "summary.json").read_text())["zero_stage"]
    if stage == 0:
        module = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        return {k: v.float() for k, v in module.items() if v.is_floating_point()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag).items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest difference over the entries both hold (stage 0 also saves buffers)."""
    common = a.keys() & b.keys()
    assert len(common) >= 0.9 * min(len(a), len(b)) and common
    return max(float((a[k] - b[k]).abs().max()) for k in common)


def outcomes(root: Path, out_name: str) -> list[dict]:
    jobs = json.loads((root / "jobs.json").read_text())
    return [job["outcomes"] for job in jobs if Path(job["out"]).name == out_name][-1]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name, clip, value, step, rank", CLIPPED, ids=[c[0] for c in CLIPPED])
def test_two_ranks_equal_one_rank_with_clipping_and_a_skipped_step(two_ranks, tmp_path, stage, name, clip, value, step, rank):
    """Same global batch (2 x 8 = 16), same seed: the parameters after 5 steps agree, with the
    clip binding and one step's gradient made NaN on one rank only: skipped on both ranks."""
    reference = one_rank(tmp_path, "one", fsq(stage, 16, clip, value, (step,)))
    assert json.loads((reference / "summary.json").read_text())["skipped_steps"] == 1
    assert [o["skipped_steps"] for o in outcomes(two_ranks, f"{name}-z{stage}")] == [1, 1]
    assert max_diff(final_params(two_ranks / f"{name}-z{stage}"), final_params(reference)) < TOL


@pytest.mark.parametrize("name, clip, value, step, rank", CLIPPED, ids=[c[0] for c in CLIPPED])
def test_clipping_binds_and_is_the_same_at_every_stage(tmp_path, name, clip, value, step, rank):
    """The clip values above change the trajectory (so the equality test is not vacuous), and
    one rank at stage 3 clips exactly as at stage 0."""
    unclipped = final_params(one_rank(tmp_path, "free", fsq(0, 16, poison=(step,))))
    clipped = final_params(one_rank(tmp_path, "z0", fsq(0, 16, clip, value, (step,))))
    assert max_diff(clipped, unclipped) > 20 * TOL  # Adam undoes much of a uniform rescale
    assert max_diff(final_params(one_rank(tmp_path, "z3", fsq(3, 16, clip, value, (step,)))), clipped) < TOL


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """accumulate = 2 micro-batches of 8 == one batch of 16 (same images: digits are strided), with
    AGC binding and one micro-batch's gradient NaN: that whole step is skipped in both."""
    whole = fsq(0, 16, "agc", 0.01, (3,))
    split = fsq(0, 8, "agc", 0.01, (3,))
    split["optim"]["accumulate"] = 2
    a, b = one_rank(tmp_path, "whole", whole), one_rank(tmp_path, "split", split)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (a, b)]
    assert [s["skipped_steps"] for s in summaries] == [1, 1] and summaries[1]["global_batch"] == 16
    assert max_diff(final_params(a), final_params(b)) < TOL


def test_eta_is_identical_across_ranks_and_sampling_noise_is_not(two_ranks):
    probes = [read_jsonl(two_ranks / f"probe-{rank}.jsonl") for rank in (0, 1)]
    assert [r["step"] for r in probes[0]] == [1, 2, 3, 4] == [r["step"] for r in probes[1]]
    assert [r["eta"] for r in probes[0]] == [r["eta"] for r in probes[1]]
    assert len({r["eta"] for r in probes[0]}) > 1  # η moved
    assert all(a["rng"] != b["rng"] for a, b in zip(*probes))


def test_two_rank_stop_and_resume_equals_an_uninterrupted_run(two_ranks):
    """DAPS-NA (sampling noise) on parquet shards with 2 DataLoader workers per rank, ZeRO-2:
    3 steps, stop, --resume to 6 == 6 steps straight through (parameters and logged losses)."""
    full, resumed = two_ranks / "hf-full", two_ranks / "hf-part"
    assert max_diff(final_params(resumed), final_params(full)) == 0.0
    losses = [[r["loss"] for r in read_jsonl(d / "metrics.jsonl") if r["kind"] == "train"] for d in (full, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_held_out_figures_agree_on_two_ranks_after_resume_and_from_ngkit_eval(two_ranks):
    """The issue's case: 2 ranks, straight vs 3 + --resume to 6, and `ngkit eval` of the run on
    one process. BatchNorm's running statistics are per rank (broadcast from rank 0 every step)
    and the decoder sees each held-out image in the same batch on 1 rank and 2."""
    from ngkit.cli.main import main

    full, part = (json.loads((two_ranks / d / "summary.json").read_text())["metrics"] for d in ("hf-full", "hf-part"))
    assert main(["eval", str(two_ranks / "hf-full"), "--metric", "mse", "--metric", "psnr", "--json"]) == 0
    [record] = [json.loads(p.read_text()) for p in (two_ranks / "hf-full").glob("eval-*.json")]
    assert record["num_images"] == 6 and record["step"] == 6
    for key in ("mse", "psnr"):
        assert part[key] == pytest.approx(full[key], rel=1e-9, abs=0)
        assert record["values"][key] == pytest.approx(full[key], rel=1e-9, abs=0)


@pytest.mark.parametrize("data", ["digits", "parquet"])
def test_one_rank_stop_and_resume_equals_an_uninterrupted_run(tmp_path, data):
    if data == "digits":
        raw = lambda steps: tiny(  # noqa: E731
            data={"workers": 2}, schedule={"beta": {"name": "exponential", "start": 0.5, "end": 0.01, "steps": 6}},
            run={"steps": steps, "log_every": 1, "eval_every": 0, "checkpoint_every": 0, "checkpoint_minutes": 0})
    else:
        parquet = write_parquet(tmp_path / "pq", train=10, shards=3)
        raw = lambda steps: daps_hf(parquet, steps, stage=0)  # noqa: E731
    full = one_rank(tmp_path, "full", raw(6))
    part = one_rank(tmp_path, "part", raw(3))
    one_rank(tmp_path, "part", raw(6), resume=True)
    assert max_diff(final_params(part), final_params(full)) == 0.0
    losses = [[r["loss"] for r in read_jsonl(d / "metrics.jsonl") if r["kind"] == "train"] for d in (full, part)]
    assert losses[0] == losses[1]


def test_imagenet256_recipe_runs_on_two_ranks(two_ranks):
    summary = json.loads((two_ranks / "imagenet" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 1 and summary["precision"] == "bf16"
    assert summary["step"] == 3 and summary["recipe"] == "daps" and summary["encoder_attention"] == "sdpa"
    assert summary["global_batch"] == 4
    assert 0 < summary["metrics"]["mse"] < 1
