"""Exact means exact: every method plugin, with its stateful options on, resumed from a
mid-run checkpoint ends with the same weights, buffers and extra state, bit for bit, as the
uninterrupted run (one process; tests/test_scale.py covers two ranks)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ngkit.engine import checkpoint
from ngkit.engine.train_loop import train
from ngkit.recipe import parse_recipe
from tiny_recipe import tiny

STEPS, SAVE_AT = 4, 2  # the straight run checkpoints at SAVE_AT; a copy resumes from there

# method table -> the state it keeps between steps
METHODS = {
    "daps trust region + code splitting + learned eta": {
        "name": "daps", "samples": 4, "trust_region": 0.05, "split_dead_codes": 3, "split_below": 0.9,
        "step_size": {"name": "ess", "lr": 0.1}},
    "daps-na trust region": {"name": "daps-na", "samples": 4, "trust_region": 0.05, "trust_region_init": 3.0},
    "ppo stored rollouts + kl_coef": {"name": "ppo", "samples": 2, "epochs": 2},
    "reinforce": {"name": "reinforce", "samples": 2},
    "gumbel": {"name": "gumbel"},
    "gr-mck": {"name": "gr-mck", "rao_samples": 2},
    "vqvae ema codebook + dead-code expiry": {"name": "vqvae", "quantizer": {
        "name": "vq", "dim": 8, "threshold_ema_dead_code": 1}},
    "fsq": {"name": "fsq", "quantizer": {"name": "fsq", "levels": [4, 4]}},
}


def module_state(out: Path) -> dict:
    """Everything the last checkpoint holds of the method: the module (ZeRO 0: one file, buffers
    included) and this rank's own state, read as anything travelling is: weights_only."""
    ckpt = out / "checkpoints" / checkpoint.latest_tag(out / "checkpoints")
    own = torch.load(ckpt / "rank-0.pt", weights_only=True)
    return {**torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True)["module"],
            "rank state": own["method"], "rng": own["rng"]}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return a == b


@pytest.mark.parametrize("method", list(METHODS.values()), ids=list(METHODS))
def test_resume_is_bit_exact_for_every_method(tmp_path, method, one_thread):
    raw = tiny(method=method, data={"batch_size": 8},
               run={"steps": STEPS, "log_every": 1, "eval_every": 0, "checkpoint_every": SAVE_AT,
                    "checkpoint_minutes": 0, "keep_checkpoints": 2},
               eval={"metrics": ["mse"], "num_images": 8, "batch_size": 8})
    if method["name"] in ("gumbel", "gr-mck"):
        raw["method"]["temperature_end"] = 0.5
    recipe = parse_recipe(raw, "exact")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(recipe, straight, quiet=True)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / checkpoint.step_tag(STEPS))
    train(recipe, resumed, resume=True, quiet=True)
    a, b = module_state(straight), module_state(resumed)
    assert a.keys() == b.keys()
    differ = [k for k in a if not same(a[k], b[k])]
    assert differ == []


def test_the_trust_region_anchor_travels_in_the_checkpoint(tmp_path, one_thread):
    raw = tiny(method=METHODS["daps-na trust region"], data={"batch_size": 8},
               run={"steps": SAVE_AT, "log_every": 1, "eval_every": 0, "checkpoint_every": 0, "checkpoint_minutes": 0},
               eval={"metrics": ["mse"], "num_images": 8, "batch_size": 8})
    train(parse_recipe(raw, "anchor"), tmp_path / "run", quiet=True)
    tag = checkpoint.latest_tag(tmp_path / "run" / "checkpoints")
    own = torch.load(tmp_path / "run" / "checkpoints" / tag / "rank-0.pt", weights_only=True)
    x, z, logits = own["method"][""]["anchor"]  # "": the method itself, beside its submodules
    assert x.shape == (8, 1, 8, 8) and z.shape[1:] == (8, 16) and logits.shape[-1] == 16
