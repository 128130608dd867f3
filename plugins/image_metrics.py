"""Built-in metrics "psnr", "mse" and "ssim": pixel fidelity of reconstructions in [0, 1].

Each is computed per image and averaged over images (the paper's convention; a global MSE
would weight every pixel equally instead, which here is the same for MSE but not for PSNR).
Sums are kept in float64 and summed over ranks in ``compute``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ngkit import hookimpl, versions
from ngkit.components import EvalBatch, Register
from ngkit.distributed import sum_over_ranks
from ngkit.errors import NgkitError

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")

SSIM_SIGMA = 1.5  # Wang et al. (2004): Gaussian window sigma 1.5 ...
SSIM_WINDOW = 11  # ... truncated to 11 taps (radius int(3.5 * sigma + 0.5), as scikit-image)


class _PerImageMean:
    """Streaming mean over images of a per-image value: a float64 (sum, count) pair."""

    def __init__(self) -> None:
        self.totals = torch.zeros(2, dtype=torch.float64)

    def add(self, per_image: Tensor) -> None:
        per_image = per_image.detach().double()
        self.totals = self.totals.to(per_image.device)
        self.totals += torch.stack([per_image.sum(), per_image.new_tensor(per_image.numel())])

    def mean(self) -> tuple[float, int]:
        total, count = sum_over_ranks(self.totals).tolist()
        if count == 0:
            raise NgkitError("no images were evaluated")
        return total / count, int(count)


def per_image_mse(batch: EvalBatch) -> Tensor:
    """Mean squared error of each image over its C x H x W pixels (pixels in [0, 1])."""
    diff = batch.reconstructions.double() - batch.images.double()
    return diff.square().flatten(1).mean(1)


class _PerImageMetric:
    """A metric that is the mean over images of one number per image; subclasses say which."""

    name: str
    definition: str

    def __init__(self) -> None:
        self._mean = _PerImageMean()
        self._images = 0

    def per_image(self, batch: EvalBatch) -> Tensor:
        raise NotImplementedError

    def update(self, batch: EvalBatch) -> None:
        self._mean.add(self.per_image(batch))

    def compute(self) -> dict[str, float]:
        value, self._images = self._mean.mean()
        return {self.name: value}

    def protocol(self) -> dict[str, Any]:
        return {"metric": self.name, "definition": self.definition, "images": self._images, "versions": versions()}


class MseMetric(_PerImageMetric):
    """Mean squared error per pixel in [0, 1] units, averaged over images."""

    name = "mse"
    definition = "mean over images of the per-pixel squared error, pixels in [0, 1]"

    def per_image(self, batch: EvalBatch) -> Tensor:
        return per_image_mse(batch)


class PsnrMetric(_PerImageMetric):
    """Peak signal-to-noise ratio in dB with peak 1 (pixels in [0, 1]), per image, averaged.

    A perfect reconstruction has infinite PSNR, and so then has the mean; no epsilon is added.
    """

    name = "psnr"
    definition = "mean over images of -10 log10(MSE) dB, pixels in [0, 1], peak 1"

    def per_image(self, batch: EvalBatch) -> Tensor:
        return -10 * torch.log10(per_image_mse(batch))


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """Window size and Gaussian sigma for images of this size.

    The standard 11-tap window with sigma 1.5 where it fits; on smaller images (8x8 digits) the
    largest odd size k <= the smaller side, with sigma = 1.5 k / 11 so that the truncation rule
    shared by torchmetrics and scikit-image (radius int(3.5 sigma + 0.5)) gives exactly k taps.
    """
    side = min(height, width)
    if side < 3:
        raise NgkitError(f"ssim: images of {height}x{width} pixels are too small (needs at least 3x3)")
    k = min(SSIM_WINDOW, side if side % 2 == 1 else side - 1)
    return k, SSIM_SIGMA * k / SSIM_WINDOW


class SsimMetric:
    """Structural similarity, Gaussian window, data range 1, per image averaged over images.

    Equal to scikit-image's ``structural_similarity(x, y, gaussian_weights=True, sigma=sigma,
    use_sample_covariance=False, data_range=1, channel_axis=0)``: the SSIM map from torchmetrics
    (same kernel, K1 = 0.01, K2 = 0.03) is averaged only where the window lies inside the image.
    torchmetrics' own average also covers the reflect-padded border and comes out differently.
    """

    def __init__(self) -> None:
        self._mean = _PerImageMean()
        self._window: tuple[int, float] | None = None
        self._images = 0

    def update(self, batch: EvalBatch) -> None:
        from torchmetrics.functional.image import structural_similarity_index_measure  # seconds to import: only when SSIM runs

        if self._window is None:
            self._window = ssim_window(*batch.images.shape[-2:])
        k, sigma = self._window
        _, ssim_map = structural_similarity_index_measure(
            batch.reconstructions.float(),
            batch.images.float(),
            gaussian_kernel=True,
            sigma=sigma,
            data_range=1.0,
            return_full_image=True,
        )
        pad = (k - 1) // 2
        inside = ssim_map[..., pad : ssim_map.shape[-2] - pad, pad : ssim_map.shape[-1] - pad]
        self._mean.add(inside.flatten(1).mean(1))

    def compute(self) -> dict[str, float]:
        value, self._images = self._mean.mean()
        return {"ssim": value}

    def protocol(self) -> dict[str, Any]:
        k, sigma = self._window or (SSIM_WINDOW, SSIM_SIGMA)
        return {
            "metric": "ssim",
            "definition": (
                f"mean over images of SSIM with a {k}x{k} Gaussian window (sigma {sigma:.4g}), "
                "K1 0.01, K2 0.03, data range 1, averaged over channels and the positions where "
                "the window lies inside the image (as scikit-image)"
            ),
            "window": k,
            "sigma": sigma,
            "images": self._images,
            "versions": versions(),
        }


@hookimpl
def register_metrics(register: Register) -> None:
    register("psnr", PsnrMetric)
    register("mse", MseMetric)
    register("ssim", SsimMetric)
