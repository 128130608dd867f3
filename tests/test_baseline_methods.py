"""Every baseline method, built from a recipe-style table on the toy encoder/decoder: one
forward/backward reaches both networks with finite values, and a short run on a tiny fixed
dataset learns codes that carry information (reconstructions beat the best constant image)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from toy_models import ToyDecoder, ToyEncoder

from ngkit.binding import build_component
from ngkit.components import ImageSpec, LatentSpec, Method
from ngkit.errors import RecipeError
from ngkit_plugins.vq_lib import LibraryQuantizer

IMAGE = ImageSpec(1, 4, 4)
LATENT = LatentSpec((1, 2), 8)
STEPS = 200

# The codebook k-means-initialised from the first batch, codes used < 1 time (EMA count) replaced.
EMA_VQ = {"name": "vq", "dim": 4, "kmeans_init": True, "threshold_ema_dead_code": 1}
# (method name, recipe options); a quantizer is a sub-table, as a recipe writes it.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("vqvae", {"quantizer": {"name": "vq", "dim": 4}}),
    ("vqvae", {"quantizer": EMA_VQ}),
    ("fsq", {"quantizer": {"name": "fsq", "levels": [2, 2, 2], "preserve_symmetry": True}}),
    ("gumbel", {}),
    ("gumbel", {"hard": True, "kl_weight": 0.0}),
    ("gr-mck", {"rao_samples": 4}),
    ("reinforce", {"samples": 4}),
    ("ppo", {"samples": 4, "epochs": 2, "kl_target": 0.5}),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]


pytestmark = pytest.mark.usefixtures("one_thread")


def make(name: str, options: dict[str, Any], latent: LatentSpec = LATENT) -> Method:
    """Build a method as the core does from a recipe's [method] table."""
    torch.manual_seed(0)
    context = {
        "image": IMAGE,
        "latent": latent,
        "encoder": ToyEncoder(IMAGE, latent),
        "decoder": ToyDecoder(IMAGE, latent),
        "beta": lambda step: 0.01,
        "total_steps": STEPS,
    }
    return build_component("methods", {"name": name, **options}, context, "method")


def dataset() -> torch.Tensor:
    """8 fixed random binary images: 3 bits of information each, ~2 nats of log p to gain."""
    return (torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(1)) > 0.5).float()


def test_fsq_and_vqvae_default_to_their_quantizers() -> None:
    vq = make("vqvae", {}).quantizer
    assert isinstance(vq, LibraryQuantizer) and type(vq.module).__name__ == "VectorQuantize"
    fsq = make("fsq", {}, LatentSpec((1, 2), 1000)).quantizer
    assert type(fsq.module).__name__ == "FSQ" and fsq.module._levels.tolist() == [8, 5, 5, 5]  # the paper's
    with pytest.raises(RecipeError, match="no default levels for 12 codes"):
        make("fsq", {}, LatentSpec((1, 2), 12))


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_forward_backward_reaches_encoder_and_decoder(name: str, options: dict[str, Any]) -> None:
    method = make(name, options)
    out = method(dataset(), step=0)
    assert math.isfinite(out.loss.item()) and all(math.isfinite(v) for v in out.logs.values())
    out.loss.backward()
    for part in (method.encoder, method.decoder):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_short_training_learns_informative_codes(name: str, options: dict[str, Any]) -> None:
    x = dataset()
    method = make(name, options)
    optimiser = torch.optim.Adam(method.parameters(), lr=1e-2)
    for step in range(STEPS):
        out = method(x, step)
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
        method.after_step(step)
    method.eval()
    error = (method.decode(method.encode(x)) - x).pow(2).mean().item()
    best_constant = (x - x.mean(0)).pow(2).mean().item()
    assert error < 0.5 * best_constant
