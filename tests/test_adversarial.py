"""The PatchGAN adversarial loss (plugins/adversarial_loss.py): the discriminator's shape, the
hinge and non-saturating losses, VQGAN's adaptive weight, and the discriminator trained,
checkpointed and resumed bit for bit inside a run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ngkit.components import ImageSpec
from ngkit.engine.artifacts import read_jsonl
from ngkit.engine.train_loop import train
from ngkit.recipe import parse_recipe
from ngkit_plugins.adversarial_loss import (
    PatchGANLoss,
    adaptive_weight,
    discriminator_loss,
    generator_loss,
    patch_discriminator,
)
from tiny_recipe import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_discriminator_is_the_70x70_patchgan():
    d = patch_discriminator(3, width=8, layers=3)
    convs = [m for m in d if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.stride) for c in convs] == [((4, 4), (2, 2))] * 3 + [((4, 4), (1, 1))] * 2
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 1]
    assert d(torch.rand(1, 3, 256, 256)).shape == (1, 1, 30, 30)  # pix2pix: 30x30 patches at 256
    with pytest.raises(ValueError, match="layers <= "):
        PatchGANLoss(image=ImageSpec(1, 8, 8), layers=3)


def test_hinge_and_non_saturating_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0]).view(3, 1, 1, 1)
    fake = torch.tensor([-2.0, 0.0, 0.5]).view(3, 1, 1, 1)
    # hinge: relu(1 - real) = [0, 0.5, 2], relu(1 + fake) = [0, 1, 1.5]
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.5 * (2.5 / 3 + 2.5 / 3))
    sp = torch.nn.functional.softplus
    want = 0.5 * (sp(-real).mean() + sp(fake).mean())
    assert discriminator_loss(real, fake, "non-saturating").item() == pytest.approx(want.item())
    assert generator_loss(fake, "hinge").tolist() == [2.0, 0.0, -0.5]
    assert generator_loss(fake, "non-saturating").tolist() == pytest.approx(sp(-fake).flatten().tolist())


def test_the_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    nll, g = (a * w).sum(), (b * w).sum() * 0.5  # gradients a and b / 2: norms 5 and 0.5
    assert adaptive_weight(nll, g, w).item() == pytest.approx(5 / (0.5 + 1e-4))
    assert adaptive_weight(nll, 0 * g, w).item() == 1e4  # clamped
    weight = adaptive_weight(nll, g, w)
    assert not weight.requires_grad
    # the scaled term's gradient has the reconstruction loss's norm (up to eps)
    grad = torch.autograd.grad(weight * g, w)[0]
    assert grad.norm().item() == pytest.approx(5.0, rel=1e-3)


def adversarial_recipe(steps: int, **run) -> dict:
    raw = tiny(run={"steps": steps, "log_every": 1, "eval_every": 0, "checkpoint_every": 2, **run},
               eval={"metrics": ["mse"], "num_images": 16}, schedule={"beta": {"name": "constant", "value": 0.1}})
    raw["loss"] = [{"name": "patchgan", "weight": 0.5, "start": 2, "width": 8, "layers": 1}]
    return raw


def client(run_dir, step: int) -> dict:
    path = run_dir / "checkpoints" / f"step-{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=True)


def test_the_discriminator_trains_from_its_start_and_resumes_bit_for_bit(tmp_path):
    train(parse_recipe(adversarial_recipe(6), "t"), tmp_path / "straight", quiet=True)
    train(parse_recipe(adversarial_recipe(4), "t"), tmp_path / "resumed", quiet=True)
    train(parse_recipe(adversarial_recipe(6), "t"), tmp_path / "resumed", resume=True, quiet=True)
    records = [r for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if r["kind"] == "train"]
    assert ["loss/patchgan" in r for r in records] == [False, True, True, True, True, True]
    assert all("patchgan/d_loss" in r and r["loss/patchgan_scale"] > 0 for r in records[1:])
    at2, at4 = client(tmp_path / "straight", 2)["losses"]["0"], client(tmp_path / "straight", 4)["losses"]["0"]
    assert any(not torch.equal(at2["discriminator"][k], at4["discriminator"][k]) for k in at2["discriminator"])
    a, b = client(tmp_path / "straight", 6), client(tmp_path / "resumed", 6)
    for key in a["module"]:
        assert torch.equal(a["module"][key], b["module"][key]), key
    da, db = a["losses"]["0"], b["losses"]["0"]
    for key in da["discriminator"]:
        assert torch.equal(da["discriminator"][key], db["discriminator"][key]), key
    assert da["optimizer"]["state"].keys() == db["optimizer"]["state"].keys()
    for i, state in da["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, db["optimizer"]["state"][i][name]), (i, name)
    straight = [r for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if r["kind"] == "train"]
    resumed = [r for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if r["kind"] == "train"]
    drop = ("images_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in straight] == \
        [{k: v for k, v in r.items() if k not in drop} for r in resumed]
