"""PSNR, MSE and SSIM: closed forms, scikit-image as the reference, streaming, ranks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.datasets import load_digits

from ngkit.components import EvalBatch, LatentSpec
from ngkit.errors import NgkitError
from ngkit.plugins import get_registry
from ngkit_plugins.image_metrics import MseMetric, PsnrMetric, SsimMetric, ssim_window

LATENT = LatentSpec(grid=(2, 2), codes=16)


def batch(images: torch.Tensor, reconstructions: torch.Tensor) -> EvalBatch:
    return EvalBatch(images, reconstructions, torch.zeros(images.shape[0], 4, dtype=torch.long), LATENT)


def run(metric: object, images: torch.Tensor, reconstructions: torch.Tensor, batch_size: int = 4) -> dict[str, float]:
    for x, y in zip(images.split(batch_size), reconstructions.split(batch_size)):
        metric.update(batch(x, y))  # type: ignore[attr-defined]
    return metric.compute()  # type: ignore[attr-defined]


def astronaut_pairs(n: int = 6, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """n RGB crops and noisy, blurred-ish versions of them, both in [0, 1]."""
    photo = torch.from_numpy(skdata.astronaut()).permute(2, 0, 1).double() / 255
    crops = torch.stack([photo[:, 100 + 40 * i : 100 + 40 * i + size, 150 : 150 + size] for i in range(n)])
    noise = torch.randn(crops.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scale = torch.linspace(0.02, 0.2, n, dtype=torch.float64).view(n, 1, 1, 1)  # a PSNR spread
    return crops, (crops + scale * noise).clamp(0, 1)


def test_metrics_are_registered() -> None:
    registry = get_registry()
    assert registry.get("metrics", "psnr").factory is PsnrMetric
    assert registry.get("metrics", "mse").factory is MseMetric
    assert registry.get("metrics", "ssim").factory is SsimMetric


def test_constant_offset_has_closed_form_psnr_and_mse() -> None:
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5 + 0.25
    for offset in (0.1, 0.03):
        expected = -10 * math.log10(offset**2)
        assert run(PsnrMetric(), images, images + offset)["psnr"] == pytest.approx(expected, rel=1e-9)
        assert run(MseMetric(), images, images - offset)["mse"] == pytest.approx(offset**2, rel=1e-9)


def test_psnr_is_averaged_per_image_not_over_pooled_pixels() -> None:
    images = torch.full((2, 1, 4, 4), 0.5, dtype=torch.float64)
    reconstructions = images + torch.tensor([0.1, 0.01], dtype=torch.float64).view(2, 1, 1, 1)
    psnr = run(PsnrMetric(), images, reconstructions)["psnr"]
    assert psnr == pytest.approx((20 + 40) / 2, rel=1e-6)  # the pooled MSE would give 23.0 dB


def test_psnr_and_mse_match_scikit_image() -> None:
    images, reconstructions = astronaut_pairs()
    expected_psnr = np.mean(
        [peak_signal_noise_ratio(x.numpy(), y.numpy(), data_range=1) for x, y in zip(images, reconstructions)]
    )
    expected_mse = np.mean([np.mean((x.numpy() - y.numpy()) ** 2) for x, y in zip(images, reconstructions)])
    assert run(PsnrMetric(), images, reconstructions)["psnr"] == pytest.approx(expected_psnr, rel=1e-10)
    assert run(MseMetric(), images, reconstructions)["mse"] == pytest.approx(expected_mse, rel=1e-10)


def skimage_ssim(images: torch.Tensor, reconstructions: torch.Tensor, sigma: float) -> float:
    return float(
        np.mean(
            [
                structural_similarity(
                    x.numpy(),
                    y.numpy(),
                    gaussian_weights=True,
                    sigma=sigma,
                    use_sample_covariance=False,
                    data_range=1,
                    channel_axis=0,
                )
                for x, y in zip(images, reconstructions)
            ]
        )
    )


def test_ssim_matches_scikit_image_with_the_standard_window() -> None:
    images, reconstructions = astronaut_pairs()
    metric = SsimMetric()
    value = run(metric, images.float(), reconstructions.float())["ssim"]
    assert value == pytest.approx(skimage_ssim(images, reconstructions, sigma=1.5), abs=2e-5)
    assert 0.1 < value < 0.99
    assert metric.protocol()["window"] == 11 and metric.protocol()["sigma"] == 1.5


def test_ssim_on_8x8_digits_uses_a_7_tap_window_and_matches_scikit_image() -> None:
    digits = torch.from_numpy(load_digits().images[:10] / 16).unsqueeze(1)  # [10, 1, 8, 8] in [0, 1]
    blurred = (0.6 * digits + 0.4 * digits.roll(1, dims=-1)).clamp(0, 1)
    metric = SsimMetric()
    value = run(metric, digits.float(), blurred.float())["ssim"]
    window, sigma = 7, 1.5 * 7 / 11
    assert metric.protocol()["window"] == window and metric.protocol()["sigma"] == pytest.approx(sigma)
    # scikit-image derives its window from sigma: 2 * int(3.5 * sigma + 0.5) + 1 taps.
    assert 2 * int(3.5 * sigma + 0.5) + 1 == window
    assert value == pytest.approx(skimage_ssim(digits, blurred, sigma=sigma), abs=2e-5)


@pytest.mark.parametrize(("side", "window"), [(3, 3), (8, 7), (9, 9), (10, 9), (11, 11), (256, 11)])
def test_ssim_window_is_the_largest_odd_size_that_fits_up_to_11(side: int, window: int) -> None:
    k, sigma = ssim_window(side, side + 5)
    assert k == window
    assert 2 * int(3.5 * sigma + 0.5) + 1 == k  # the Gaussian's own truncation gives k taps


def test_ssim_is_one_for_perfect_reconstructions_and_rejects_tiny_images() -> None:
    images, _ = astronaut_pairs(3)
    assert run(SsimMetric(), images.float(), images.float())["ssim"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(NgkitError, match="too small"):
        SsimMetric().update(batch(torch.rand(1, 1, 2, 8), torch.rand(1, 1, 2, 8)))


def test_results_do_not_depend_on_batching() -> None:
    images, reconstructions = astronaut_pairs()
    for make in (PsnrMetric, MseMetric, SsimMetric):
        one, other = run(make(), images, reconstructions, 1), run(make(), images, reconstructions, 4)
        assert one == pytest.approx(other, rel=1e-9)


def test_compute_without_images_is_an_error() -> None:
    with pytest.raises(NgkitError, match="no images"):
        PsnrMetric().compute()


def _two_ranks(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    images, reconstructions = astronaut_pairs()
    half = slice(0, 2) if rank == 0 else slice(2, 6)  # uneven shares
    values = {}
    for make in (PsnrMetric, MseMetric, SsimMetric):
        metric = make()
        metric.update(batch(images[half].float(), reconstructions[half].float()))
        values.update(metric.compute())
        values[f"{metric.protocol()['metric']}_images"] = metric.protocol()["images"]
    torch.save(values, f"{out}.{rank}")
    dist.destroy_process_group()


def test_compute_gathers_over_ranks(tmp_path: Path) -> None:
    out = str(tmp_path / "values")
    mp.spawn(_two_ranks, args=(str(tmp_path / "init"), out), nprocs=2)
    images, reconstructions = astronaut_pairs()
    expected = {}
    for make in (PsnrMetric, MseMetric, SsimMetric):
        expected.update(run(make(), images.float(), reconstructions.float()))
    for rank in (0, 1):
        values = torch.load(f"{out}.{rank}")
        assert values["psnr_images"] == values["mse_images"] == values["ssim_images"] == 6
        for key in expected:
            assert values[key] == pytest.approx(expected[key], rel=1e-6), (rank, key)
