"""LPIPS (plugins/lpips_loss.py) against the reference layout and formula, and ``[[loss]]``
tables (ngkit/losses.py) in training."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ngkit import weights
from ngkit.components import StepOutput
from ngkit.engine.artifacts import read_jsonl
from ngkit.engine.train_loop import train
from ngkit.errors import RecipeError, WeightsError
from ngkit.losses import WeightedLoss, attach_losses
from ngkit.recipe import parse_recipe
from ngkit_plugins.lpips_loss import HEADS, HEADS_SHA256, LPIPS, lpips_loss
from tiny_recipe import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

# torchvision.models.vgg16().features: (index, in, out) of each 3x3 convolution; a ReLU follows
# each, max pools sit at 4, 9, 16, 23, 30 (torchvision/models/vgg.py, cfgs["D"]).
TORCHVISION_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
                     (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
                     (26, 512, 512), (28, 512, 512)]
POOLS = (4, 9, 16, 23, 30)
# lpips/weights/v0.1/vgg.pth of the lpips package: the heads' names and shapes
LPIPS_HEADS = {"lin0.model.1.weight": (1, 64, 1, 1), "lin1.model.1.weight": (1, 128, 1, 1),
               "lin2.model.1.weight": (1, 256, 1, 1), "lin3.model.1.weight": (1, 512, 1, 1),
               "lin4.model.1.weight": (1, 512, 1, 1)}


def test_the_trunk_is_torchvisions_vgg16_features_layer_for_layer():
    features = LPIPS().net.features
    assert len(features) == 31
    convs = {i for i, _, _ in TORCHVISION_CONVS}
    for i, layer in enumerate(features):
        kind = nn.Conv2d if i in convs else nn.MaxPool2d if i in POOLS else nn.ReLU
        assert type(layer) is kind, i
    want = {}
    for i, c_in, c_out in TORCHVISION_CONVS:
        want[f"features.{i}.weight"], want[f"features.{i}.bias"] = (c_out, c_in, 3, 3), (c_out,)
        assert features[i].padding == (1, 1)
    assert {k: tuple(v.shape) for k, v in LPIPS().net.state_dict().items()} == want


def test_the_heads_have_the_lpips_layout_and_the_shipped_copy_its_hash():
    heads = {k: tuple(v.shape) for k, v in LPIPS().state_dict().items() if k.startswith("lin")}
    assert heads == LPIPS_HEADS
    assert hashlib.sha256(HEADS.read_bytes()).hexdigest() == HEADS_SHA256
    from safetensors.torch import load_file

    shipped = load_file(HEADS)
    assert {k: tuple(v.shape) for k, v in shipped.items()} == LPIPS_HEADS
    assert all((v >= 0).all() for v in shipped.values())  # LPIPS clamps its learned weights at 0
    model = lpips_loss(pretrained=False)
    for key, value in shipped.items():
        assert torch.equal(model.state_dict()[key], value)


def reference_lpips(x0: torch.Tensor, x1: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The lpips package's LPIPS(net="vgg", version="0.1")(x0, x1, normalize=True) written out in
    float64 from its source: scaling layer, VGG slices to relu1_2..relu5_3, normalize_tensor,
    squared difference, 1x1 conv heads, spatial_average, sum over layers."""
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    taps = {3: 0, 8: 1, 15: 2, 22: 3, 29: 4}  # slice ends: features[0:4], [4:9], [9:16], [16:23], [23:30]
    conv_at = {i for i, _, _ in TORCHVISION_CONVS}

    def features(x: torch.Tensor) -> list[torch.Tensor]:
        h, out = (2 * x.double() - 1 - shift) / scale, []
        for i in range(30):
            if i in conv_at:
                h = F.conv2d(h, state[f"net.features.{i}.weight"].double(), state[f"net.features.{i}.bias"].double(), padding=1)
            elif i in POOLS:
                h = F.max_pool2d(h, 2, 2)
            else:
                h = h.clamp_min(0)
            if i in taps:
                out.append(h)
        return out

    total = 0
    for k, (f0, f1) in enumerate(zip(features(x0), features(x1))):
        n0 = f0 / (torch.sqrt(torch.sum(f0**2, dim=1, keepdim=True)) + 1e-10)
        n1 = f1 / (torch.sqrt(torch.sum(f1**2, dim=1, keepdim=True)) + 1e-10)
        weighted = F.conv2d((n0 - n1) ** 2, state[f"lin{k}.model.1.weight"].double())
        total = total + weighted.mean([2, 3], keepdim=True)
    return total.flatten()


def test_the_distance_equals_a_float64_transcription_of_the_reference():
    model = lpips_loss(pretrained=False)  # fixed random trunk, the shipped heads
    generator = torch.Generator().manual_seed(1)
    x0, x1 = torch.rand(3, 3, 32, 32, generator=generator), torch.rand(3, 3, 32, 32, generator=generator)
    want = reference_lpips(x0, x1, model.state_dict())
    assert (want > 0).all()
    # float64 but for the shift/scale constants, held as float32 (rounded by ~3e-8 relative)
    torch.testing.assert_close(model.double()(x0.double(), x1.double()), want, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(model.float()(x0, x1).double(), want, rtol=1e-4, atol=1e-6)
    near = (x0 + 0.02 * torch.randn(x0.shape, generator=generator)).clamp(0, 1)
    assert (model(x0, near) < model(x0, x1)).all()  # a small perturbation is nearer than another image


def test_identical_images_are_at_distance_zero_and_grey_small_images_work():
    model = lpips_loss(pretrained=False)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(model(x, x), torch.zeros(2))
    grey = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))  # digits: upsampled, repeated
    assert torch.equal(model(grey, grey), torch.zeros(2)) and (model(grey, grey.flip(0)) > 0).all()


def test_vgg_weights_are_found_like_the_inception_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("NGKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NGKIT_VGG16_WEIGHTS", raising=False)
    with pytest.raises(WeightsError, match="download.pytorch.org/models/vgg16-397923af.pth"):
        lpips_loss()
    # a torchvision-format file (features and a classifier) with random weights, trusted by its hash
    trunk = lpips_loss(pretrained=False).net.state_dict()
    file = tmp_path / "vgg16-random.pth"
    torch.save({**trunk, "classifier.0.weight": torch.zeros(2, 2)}, file)
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    monkeypatch.setitem(weights.KNOWN_WEIGHTS, "vgg16", replace(weights.KNOWN_WEIGHTS["vgg16"], sha256=digest))
    monkeypatch.setenv("NGKIT_VGG16_WEIGHTS", str(file))
    loaded = lpips_loss()
    for key, value in trunk.items():
        assert torch.equal(loaded.net.state_dict()[key], value)
    monkeypatch.setitem(weights.KNOWN_WEIGHTS, "vgg16", replace(weights.KNOWN_WEIGHTS["vgg16"], sha256="0" * 64))
    with pytest.raises(WeightsError, match="SHA-256"):
        lpips_loss()


class Toy(nn.Module):
    """A method whose decoder is scored by ``log_prob`` in its forward, like every method's."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Conv2d(1, 1, 1)
        self.decoder.log_prob = lambda x, params: -(x - params).square().flatten(1).sum(1)
        self.decoder.mean = lambda params: params.clamp(0, 1)

    def forward(self, x, step):
        logp = self.decoder.log_prob(x, self.decoder(x))
        return StepOutput(-logp.mean(), {"logp": float(logp.detach().mean())})

    def after_step(self, step):
        return {}


def test_attached_losses_lower_the_training_log_likelihood_from_their_start_step():
    toy = Toy()
    l1 = lambda x, r: (x - r).abs().flatten(1).mean(1)  # noqa: E731
    attach_losses(toy, [WeightedLoss("l1", 2.0, 3, l1)], torch.device("cpu"))
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    params = toy.decoder(x).detach()
    plain = -(x - params).square().flatten(1).sum(1)
    assert "loss/l1" not in toy(x, 2).logs  # before start
    out = toy(x, 3)
    assert out.logs["loss/l1"] == pytest.approx(float(l1(x, params.clamp(0, 1)).mean()))
    assert out.loss.item() == pytest.approx(float(-(plain - 2.0 * l1(x, params.clamp(0, 1))).mean()), rel=1e-6)
    toy.eval()  # evaluation scores the decoder's own likelihood (the reported beta-ELBO)
    torch.testing.assert_close(toy.decoder.log_prob(x, params), plain)
    assert "decoder.weight" in toy.state_dict() and len(toy.state_dict()) == 2  # no new state


def test_a_run_with_lpips_logs_it_from_its_start_step(tmp_path):
    raw = tiny(run={"steps": 4, "log_every": 1, "eval_every": 0, "checkpoint_every": 0},
               eval={"metrics": ["mse"], "num_images": 16})
    raw["loss"] = [{"name": "lpips", "pretrained": False, "weight": 10.0, "start": 3}]
    train(parse_recipe(raw, "t"), tmp_path / "run", quiet=True)
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert ["loss/lpips" in r for r in records] == [False, False, True, True]
    assert all(r["loss/lpips"] > 0 for r in records[2:])


def test_a_loss_table_is_checked_against_its_factory():
    raw = tiny()
    raw["loss"] = [{"name": "lpips", "pretrainde": False}, {"name": "lpip"}]
    with pytest.raises(RecipeError) as err:
        parse_recipe(raw, "t")
    text = str(err.value)
    assert '[loss.0.pretrainde] unknown option' in text and 'did you mean "pretrained"' in text
    assert '[loss.1] unknown loss name "lpip"' in text
