"""Conv (Gaussian) and MLP (Bernoulli) decoders: likelihoods against closed forms computed by
hand, shapes, embeddings of codes vs one-hots, and the ImageNet-256 build on the meta device."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ngkit.components import ImageSpec, LatentSpec, pixel_stats
from ngkit.plugins import get_registry
from ngkit_plugins.conv_decoder import ConvDecoder
from ngkit_plugins.mlp_decoder import MlpDecoder

IMAGE = ImageSpec(channels=2, height=8, width=8, mean=(0.5, 0.3), std=(0.25, 0.5))
LATENT = LatentSpec(grid=(2, 2), codes=5)


def conv(**options: object) -> ConvDecoder:
    torch.manual_seed(0)
    return ConvDecoder(image=IMAGE, latent=LATENT, width=8, embed_dim=6, **options)


def test_registered_names() -> None:
    registry = get_registry()
    assert registry.get("decoders", "conv").factory is ConvDecoder
    assert registry.get("decoders", "mlp").factory is MlpDecoder


def test_gaussian_log_prob_matches_hand_computation_with_clipped_variance() -> None:
    dec = conv()
    params = torch.zeros(1, 4, 8, 8)
    x = torch.full((1, 2, 8, 8), 0.5)
    # pixel (0, 0): channel 0 mean 0.2 with log-variance -10 (clipped up to variance 0.01),
    # channel 1 mean -1 with log-variance 3 (clipped down to variance 1); pixel (0, 1): variance 0.25.
    params[0, 0, 0, 0], params[0, 2, 0, 0], x[0, 0, 0, 0] = 0.2, -10.0, 0.6
    params[0, 1, 0, 0], params[0, 3, 0, 0], x[0, 1, 0, 0] = -1.0, 3.0, 0.1
    params[0, 0, 0, 1], params[0, 2, 0, 1], x[0, 0, 0, 1] = 0.4, math.log(0.25), 0.9
    expected = 0.0
    for c in range(2):
        for i in range(8):
            for j in range(8):
                mu = params[0, c, i, j].item()
                var = min(max(math.exp(params[0, c + 2, i, j].item()), 0.01), 1.0)
                xs = (x[0, c, i, j].item() - IMAGE.mean[c]) / IMAGE.std[c]
                expected += -0.5 * math.log(2 * math.pi * var) - (xs - mu) ** 2 / (2 * var)
    assert dec.log_prob(x, params).item() == pytest.approx(expected, rel=1e-5)


def test_fixed_likelihood_uses_the_given_std() -> None:
    dec = conv(likelihood="fixed", fixed_std=0.5)
    params = torch.randn(2, 2, 8, 8)
    x = torch.rand(2, 2, 8, 8)
    mean, std = pixel_stats(IMAGE)
    expected = torch.distributions.Normal(params, 0.5).log_prob((x - mean) / std).flatten(1).sum(-1)
    torch.testing.assert_close(dec.log_prob(x, params), expected)


def test_mean_is_destandardised_and_clamped() -> None:
    dec = conv()
    params = torch.zeros(1, 4, 8, 8)
    params[0, 0, 0, 0], params[0, 1, 0, 0] = 0.8, -0.2  # in range: 0.5 + 0.8*0.25, 0.3 - 0.2*0.5
    params[0, 0, 0, 1], params[0, 1, 0, 1] = 50.0, -50.0  # far outside [0, 1]
    m = dec.mean(params)
    assert m.shape == (1, 2, 8, 8) and 0 <= m.min() and m.max() <= 1
    torch.testing.assert_close(m[0, :, 0, 0], torch.tensor([0.7, 0.2]))
    torch.testing.assert_close(m[0, :, 0, 1], torch.tensor([1.0, 0.0]))


def test_bernoulli_log_prob_matches_hand_computation() -> None:
    image = ImageSpec(channels=1, height=2, width=2)
    dec = MlpDecoder(image=image, latent=LATENT, hidden=8, layers=1, embed_dim=3)
    logits = torch.tensor([[[[2.0, -1.0], [0.0, 4.0]]]])
    x = torch.tensor([[[[1.0, 0.0], [0.3, 0.9]]]])
    expected = 0.0
    for lg, xi in zip(logits.flatten().tolist(), x.flatten().tolist()):
        p = 1 / (1 + math.exp(-lg))
        expected += xi * math.log(p) + (1 - xi) * math.log(1 - p)
    assert dec.log_prob(x, logits).item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(dec.mean(logits), torch.sigmoid(logits))


@pytest.mark.parametrize("likelihood, channels", [("gaussian", 4), ("fixed", 2)])
def test_conv_shapes(likelihood: str, channels: int) -> None:
    dec = conv(likelihood=likelihood)
    z = torch.randint(5, (3, 4))
    params = dec(dec.embed(z))
    assert params.shape == (3, channels, 8, 8)
    assert dec.log_prob(torch.rand(3, 2, 8, 8), params).shape == (3,)
    assert dec.mean(params).shape == (3, 2, 8, 8)


def test_mlp_shapes_and_mean_range() -> None:
    dec = MlpDecoder(image=IMAGE, latent=LATENT, hidden=16)
    params = dec(dec.embed(torch.randint(5, (3, 4))))
    assert params.shape == (3, 2, 8, 8)
    m = dec.mean(params)
    assert dec.log_prob(torch.rand(3, 2, 8, 8), params).shape == (3,) and 0 <= m.min() and m.max() <= 1


@pytest.mark.parametrize("make", [conv, lambda: MlpDecoder(image=IMAGE, latent=LATENT, hidden=16)])
def test_embed_of_one_hots_equals_embed_of_codes(make) -> None:
    dec = make()
    z = torch.randint(5, (2, 3, 4))
    one_hot = F.one_hot(z, 5).float()
    torch.testing.assert_close(dec.embed(one_hot), dec.embed(z))
    assert dec.embed(z).shape == (2, 3, 4, dec.embed_dim)
    soft = torch.tensor([0.25, 0.75, 0.0, 0.0, 0.0])
    mixed = 0.25 * dec.embed(torch.tensor(0)) + 0.75 * dec.embed(torch.tensor(1))
    torch.testing.assert_close(dec.embed(soft), mixed)


def test_gradient_reaches_soft_codes() -> None:
    dec = conv()
    y = torch.rand(2, 4, 5).softmax(-1).requires_grad_()
    dec.log_prob(torch.rand(2, 2, 8, 8), dec(dec.embed(y))).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


@pytest.mark.parametrize("height, width, grid", [(6, 6, (6, 6)), (7, 7, (1, 1)), (9, 15, (3, 5))])
def test_conv_rejects_grids_it_cannot_double_to_the_image(height: int, width: int, grid: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="cannot upsample.*by doubling"):
        ConvDecoder(image=ImageSpec(3, height, width), latent=LatentSpec(grid, 8))


@pytest.mark.parametrize(
    "height, width, grid, resize, strides",
    [
        (32, 16, (4, 4), None, [(2, 2), (2, 2), (2, 1)]),  # 8 rows but 4 columns: columns stop early
        (8, 8, (4, 2), None, [(2, 2), (1, 2)]),
        (24, 24, (4, 4), (6, 6), [(2, 2), (2, 2)]),  # factor 6: 4 -> 6 cells, then doubled twice
        (28, 28, (4, 2), (7, 7), [(2, 2), (2, 2)]),  # the paper's MNIST grid: 7 x 14 patches
    ],
)
def test_conv_doubles_each_side_as_often_as_it_needs(
    height: int, width: int, grid: tuple[int, int], resize: tuple[int, int] | None, strides: list[tuple[int, int]]
) -> None:
    dec = ConvDecoder(image=ImageSpec(1, height, width), latent=LatentSpec(grid, 8), width=8, embed_dim=4)
    layers = [m for m in dec.net if isinstance(m, torch.nn.ConvTranspose2d)]
    assert dec.resize == resize and [m.stride for m in layers] == strides
    z = torch.randint(0, 8, (2, grid[0] * grid[1]))
    assert dec.mean(dec(dec.embed(z))).shape == (2, 1, height, width)


def test_bad_pixel_stats_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="one per channel"):
        pixel_stats(ImageSpec(3, 8, 8, mean=(0.5, 0.5)))


def test_imagenet256_shapes_and_parameter_count_on_meta() -> None:
    image, latent = ImageSpec(3, 256, 256), LatentSpec(grid=(32, 32), codes=1024)
    with torch.device("meta"):
        dec = ConvDecoder(image=image, latent=latent)
        z = torch.empty(2, 1024, dtype=torch.long)
        params = dec(dec.embed(z))
        logp = dec.log_prob(torch.empty(2, *image.shape), params)
    assert params.shape == (2, 6, 256, 256) and logp.shape == (2,)
    e, w = 128, 64
    res_block = 9 * w * w + 2 * w + w * w + 2 * w  # conv3x3 and conv1x1 without bias, two BNs
    upsample = 16 * 64 * 32 + 2 * 32 + 16 * 32 * 16 + 2 * 16 + 16 * 16 * 6 + 6  # 64->32->16->6
    expected = 1024 * e + 9 * e * w + w + 2 * res_block + upsample
    assert sum(p.numel() for p in dec.parameters()) == expected == 329_894  # docs/models.md


def test_digit_code_embedding_is_the_sum_of_its_digits_parts() -> None:
    from ngkit_plugins.conv_decoder import CodeEmbedding

    torch.manual_seed(0)
    emb = CodeEmbedding(256, 8, digits=2)  # base 16: code 0x35 = digits (5, 3)
    table = emb.table()
    torch.testing.assert_close(table[0x35], emb.parts[0, 5] + emb.parts[1, 3])
    z = torch.tensor([[0x35, 7, 255]])
    torch.testing.assert_close(emb(z), table[z])
    torch.testing.assert_close(emb(torch.nn.functional.one_hot(z, 256).float()), emb(z))
    # codes sharing a digit share that part, so training one code moves its neighbours too
    emb(torch.tensor([0x35])).sum().backward()
    assert emb.parts.grad[0, 5].abs().sum() > 0 and emb.parts.grad[1, 3].abs().sum() > 0
    assert emb.parts.grad[0, 4].abs().sum() == 0
    with pytest.raises(ValueError, match="digits = 1"):
        emb.split(torch.tensor([1]), torch.tensor([2]), 0.1, torch.Generator())
