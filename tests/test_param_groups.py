"""``[optim] encoder_lr`` / ``decoder_lr``: the method's encoder and decoder parameters in AdamW
groups of their own. Checked against AdamW's first step in closed form, at ZeRO 0 and 2."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ngkit.engine import checkpoint
from ngkit.engine.build import build
from ngkit.engine.deepspeed_engine import param_groups
from ngkit.engine.train_loop import seed_everything, train
from ngkit.errors import RecipeError
from ngkit.recipe import parse_recipe
from tiny_recipe import tiny

ONE_STEP = {"steps": 1, "log_every": 1, "eval_every": 0, "checkpoint_every": 1, "checkpoint_minutes": 0}


def recipe(**optim) -> dict:
    return tiny(optim={"weight_decay": 0.0, **optim}, run=ONE_STEP, data={"batch_size": 8},
                method={"name": "daps-na", "samples": 2}, eval={"metrics": ["mse"], "num_images": 8, "batch_size": 8})


def names(method: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in method.named_parameters() if id(p) in ids}


def test_one_group_by_default_and_a_partition_with_rates():
    method = build(parse_recipe(recipe(), "groups")).method
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    [only] = param_groups(method, parse_recipe(recipe(), "groups"))
    assert only["lr"] == 3e-4 and names(method, only) == trainable

    rest, dec = param_groups(method, parse_recipe(recipe(decoder_lr=1e-3), "groups"))
    assert (rest["lr"], dec["lr"]) == (3e-4, 1e-3)
    assert names(method, dec) == {f"decoder.{n}" for n, p in method.decoder.named_parameters() if p.requires_grad}
    assert names(method, rest) | names(method, dec) == trainable and not names(method, rest) & names(method, dec)

    enc, dec = param_groups(method, parse_recipe(recipe(encoder_lr=1e-4, decoder_lr=1e-3), "groups"))
    assert (enc["lr"], dec["lr"]) == (1e-4, 1e-3)  # DAPS-NA has nothing else to train: no empty group
    assert all(n.startswith("encoder.") for n in names(method, enc)) and names(method, enc) | names(method, dec) == trainable

    method.extra = nn.Linear(2, 2)  # a parameter of neither part keeps [optim] lr, first (the logged lr)
    groups = param_groups(method, parse_recipe(recipe(encoder_lr=1e-4), "groups"))
    assert [g["lr"] for g in groups] == [3e-4, 1e-4] and {n.split(".")[0] for n in names(method, groups[0])} == {"decoder", "extra"}


def test_a_rate_for_a_part_the_method_lacks_is_refused():
    class NoDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(2, 2)

    with pytest.raises(RecipeError, match=r"decoder_lr is set, but method NoDecoder has no `decoder` module"):
        param_groups(NoDecoder(), parse_recipe(recipe(decoder_lr=1e-3), "groups"))
    [enc] = param_groups(NoDecoder(), parse_recipe(recipe(encoder_lr=1e-3), "groups"))
    assert enc["lr"] == 1e-3  # every parameter is the encoder's: no empty group for the rest


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_each_group_takes_its_own_first_adamw_step(tmp_path, zero_stage, one_thread):
    # AdamW's first step moves every parameter by lr * g / (|g| + eps) with no weight decay: by its
    # group's rate wherever the gradient is well above eps, and never by more.
    enc_lr, dec_lr = 1e-3, 1e-5
    raw = recipe(encoder_lr=enc_lr, decoder_lr=dec_lr, clip="none")
    raw["distributed"] = {"zero_stage": zero_stage}
    rc = parse_recipe(raw, "groups")
    seed_everything(rc.run.seed)
    method = build(rc).method
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    train(rc, tmp_path / "run", quiet=True)
    ckpt = tmp_path / "run" / "checkpoints" / checkpoint.latest_tag(tmp_path / "run" / "checkpoints")
    after = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    # |new - old| in float32, and how far rounding the new value can move it: 2 ulps of the parameter
    moved = {part: [torch.cat(t) for t in zip(*[((after[n] - old).abs().flatten(), 2.0**-22 * old.abs().flatten())
                                                   for n, old in before.items() if n.startswith(part)])]
             for part in ("encoder.", "decoder.")}
    for part, lr in (("encoder.", enc_lr), ("decoder.", dec_lr)):
        step, rounding = moved[part]
        bad = step > lr * (1 + 2.0**-20) + rounding  # the update's own float32 rounding, then the parameter's
        assert not bad.any(), (part, step[bad][:5], rounding[bad][:5])
        assert step.max() >= lr * 0.999, part  # the largest gradients move by the full rate
        assert (step > lr * 0.5).float().mean() > 0.5, part  # and most of them nearly so


def test_resume_with_groups_is_bit_exact(tmp_path, one_thread):
    import shutil

    from test_exact_resume import module_state, same

    raw = recipe(encoder_lr=1e-4, decoder_lr=1e-3)
    raw["run"].update(steps=4, checkpoint_every=2, keep_checkpoints=2)
    raw["schedule"] = {**raw.get("schedule", {}), "warmup_steps": 2, "lr_decay": "cosine"}  # the factor moves
    rc = parse_recipe(raw, "groups")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(rc, straight, quiet=True)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / checkpoint.step_tag(4))
    train(rc, resumed, resume=True, quiet=True)
    a, b = module_state(straight), module_state(resumed)
    assert a.keys() == b.keys() and [k for k in a if not same(a[k], b[k])] == []
