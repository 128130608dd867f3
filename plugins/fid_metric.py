"""Built-in metric "fid": Fréchet Inception distance of reconstructions.

Two numbers go by the name FID and they are never comparable, so every result says which one
it is (``protocol()["mode"]``):

- ``mode = "rfid"`` (default): reconstructions against the originals of the same N held-out
  images, as tokenizer papers (VQGAN, LlamaGen, TiTok) report "rFID".
- ``mode = "generation"``: a prior's samples (``ngkit eval PRIOR_RUN --mode generation``) against
  N held-out images: the same computation as rFID, another meaning.
- ``mode = "reference"``: reconstructions against precomputed statistics of a dataset (an
  ``.npz`` with ``mu`` and ``sigma``, pytorch-fid's format), as DAPS' reference code does. Make
  such a file with :func:`compute_reference_stats` (``ngkit eval stats``).

Features are the 2048-d pool features of pytorch-fid's Inception-v3
(:mod:`ngkit.metrics.inception`), accumulated by torchmetrics' ``FrechetInceptionDistance``
in float64 (feature sums and sums of outer products, synced across ranks on compute).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ngkit import hookimpl, versions
from ngkit.components import EvalBatch, Register
from ngkit.errors import DataError, NgkitError, WeightsError
from ngkit.weights import find_weights, load_weights, sha256_of
from ngkit.metrics.inception import FEATURE_DIM, INPUT_SIZE, FIDInceptionV3

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")

RESIZE = f"bilinear to {INPUT_SIZE}x{INPUT_SIZE} (align_corners=False, no antialiasing), [0,1]→[-1,1]"
NETWORK = "Inception-v3 (TF inception-2015-12-05, pytorch-fid port), 2048-d pool features"


def _clip_rounding(eigenvalues: Tensor) -> Tensor:
    """Zero the eigenvalues of a PSD matrix that are rounding noise (numerical rank cutoff, as
    ``numpy.linalg.matrix_rank``): below d * eps * the largest one."""
    tol = eigenvalues.max().clamp(min=0) * eigenvalues.numel() * torch.finfo(eigenvalues.dtype).eps
    return torch.where(eigenvalues > tol, eigenvalues, torch.zeros_like(eigenvalues))


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """||mu1 - mu2||² + tr(S1 + S2 - 2 (S1 S2)^½) of two Gaussians, in float64.

    tr (S1 S2)^½ = tr (S1^½ S2 S1^½)^½, and S1^½ S2 S1^½ is symmetric positive semi-definite,
    so two symmetric eigendecompositions give it: at 2048 dimensions about ten times faster than
    the general eigenproblem of S1 S2 (torchmetrics) or ``scipy.linalg.sqrtm`` (pytorch-fid), and
    with real eigenvalues by construction. With fewer than 2048 images the covariances are
    rank-deficient; eigenvalues at rounding level are zeroed, so that their square roots
    (about 1e-8 of the scale each) do not add up to a spurious distance.
    """
    m1, s1, m2, s2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, sigma1, mu2, sigma2))
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)  # eigh reads one triangle: symmetrise rounding
    root1 = (v * _clip_rounding(w).sqrt()) @ v.T
    inner = root1 @ s2 @ root1
    tr_sqrt = _clip_rounding(torch.linalg.eigvalsh((inner + inner.T) / 2)).sqrt().sum()
    diff = m1 - m2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * tr_sqrt)


def gaussian_of(feature_sum: Tensor, outer_sum: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance (float64) from a feature sum and sum of outer products."""
    if n < 2:
        raise NgkitError(f"FID needs at least 2 images; got {n}")
    mu = feature_sum.double() / n
    sigma = (outer_sum.double() - n * torch.outer(mu, mu)) / (n - 1)
    return mu, sigma


class InceptionFeatures(nn.Module):
    """What torchmetrics calls the feature extractor: images ``[N, C, H, W]`` in [0, 1] ->
    float64 ``[N, 2048]``. Grey images are repeated to RGB; the network runs ``feature_batch``
    images at a time to bound memory at 299x299."""

    num_features = FEATURE_DIM  # read by torchmetrics instead of probing with a dummy image

    def __init__(self, network: FIDInceptionV3, feature_batch: int) -> None:
        super().__init__()
        if feature_batch < 1:
            raise NgkitError(f"fid: feature_batch must be at least 1; got {feature_batch}")
        self.network = network
        self.feature_batch = feature_batch

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise NgkitError(f"fid: expected images [N, 1 or 3, H, W]; got {tuple(images.shape)}")
        images = images.float().expand(-1, 3, -1, -1)
        return torch.cat([self.network(chunk) for chunk in images.split(self.feature_batch)]).double()


@dataclass
class LoadedInception:
    """The network with its weights and where they came from (for the protocol)."""

    features: InceptionFeatures
    path: Path
    sha256: str

    @classmethod
    def load(cls, weights: str | None, feature_batch: int) -> LoadedInception:
        path = find_weights("inception", weights)
        network = FIDInceptionV3()
        digest = load_weights("inception", path, network)
        return cls(InceptionFeatures(network, feature_batch), path, digest)

    def describe(self) -> dict[str, str]:
        return {"network": NETWORK, "weights_file": self.path.name, "weights_sha256": self.sha256}


@dataclass
class ReferenceStats:
    """Gaussian statistics of a reference image set, saved as ``.npz`` (``mu``, ``sigma``, plus
    ``n``, ``weights_sha256`` and a JSON ``protocol`` when ngkit wrote the file)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None
    weights_sha256: str | None = None
    protocol: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        extra: dict[str, Any] = {"protocol": np.str_(json.dumps(self.protocol))}
        if self.n is not None:
            extra["n"] = np.int64(self.n)
        if self.weights_sha256 is not None:
            extra["weights_sha256"] = np.str_(self.weights_sha256)
        with open(path, "wb") as f:  # a file object keeps numpy from appending ".npz"
            np.savez(f, mu=self.mu, sigma=self.sigma, **extra)

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(f"fid: reference statistics {path} not found (make them with 'ngkit eval stats')")
        try:
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
        except (OSError, ValueError) as exc:
            raise DataError(f"fid: {path} is not a readable .npz file: {exc}") from exc
        mu, sigma = data.get("mu"), data.get("sigma")
        if mu is None or sigma is None or mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
            found = {k: v.shape for k, v in data.items()}
            raise DataError(
                f"fid: {path} must hold mu [{FEATURE_DIM}] and sigma [{FEATURE_DIM}, {FEATURE_DIM}] "
                f"(Inception pool features); found {found}"
            )
        return cls(
            mu=mu.astype(np.float64),
            sigma=sigma.astype(np.float64),
            n=int(data["n"]) if "n" in data else None,
            weights_sha256=str(data["weights_sha256"]) if "weights_sha256" in data else None,
            protocol=json.loads(str(data["protocol"])) if "protocol" in data else {},
        )


def compute_reference_stats(
    batches: Iterable[Tensor],
    *,
    source: str,
    weights: str | None = None,
    feature_batch: int = 50,
    device: str | torch.device = "cpu",
    inception: LoadedInception | None = None,
) -> ReferenceStats:
    """Statistics of the Inception features of ``batches`` (``[B, C, H, W]`` in [0, 1]) for
    ``mode = "reference"``; ``source`` says what the images are (dataset, split, N)."""
    from torchmetrics.image.fid import FrechetInceptionDistance  # seconds to import: only when FID runs

    inception = inception or LoadedInception.load(weights, feature_batch)
    accumulator = FrechetInceptionDistance(feature=inception.features, normalize=True).to(device)
    for images in batches:
        accumulator.update(images.to(device), real=True)
    with accumulator.sync_context():
        n = int(accumulator.real_features_num_samples)
        mu, sigma = gaussian_of(accumulator.real_features_sum, accumulator.real_features_cov_sum, n)
    protocol = {"source": source, "images": n, "resize": RESIZE, **inception.describe(), "versions": versions()}
    return ReferenceStats(mu.cpu().numpy(), sigma.cpu().numpy(), n, inception.sha256, protocol)


class FidMetric:
    """FID of reconstructions: rFID against the originals, or FID against reference statistics.

    :param mode: ``"rfid"`` (reconstructions vs originals of the same images), ``"generation"``
        (a prior's samples vs held-out images) or ``"reference"`` (reconstructions vs the
        statistics in ``reference_stats``).
    :param reference_stats: ``.npz`` with ``mu`` and ``sigma``; required by, and only by,
        ``mode = "reference"``.
    :param weights: path to ``pt_inception-2015-12-05-6726825d.pth``; else found by
        :func:`ngkit.weights.find_weights`.
    :param feature_batch: images per Inception forward pass (memory at 299x299).
    """

    expensive = True  # an Inception pass per image: at the end of training and in `ngkit eval` only

    def __init__(
        self,
        mode: Literal["rfid", "generation", "reference"] = "rfid",
        reference_stats: str | None = None,
        weights: str | None = None,
        feature_batch: int = 50,
    ) -> None:
        if mode not in ("rfid", "generation", "reference"):
            raise NgkitError(f'fid: mode must be "rfid", "generation" or "reference"; got "{mode}"')
        if (mode == "reference") != (reference_stats is not None):
            raise NgkitError(
                'fid: mode = "reference" needs reference_stats = "<file>.npz" (see \'ngkit eval stats\'); '
                'mode = "rfid" or "generation" compares with held-out images and takes no reference_stats'
            )
        self.mode = mode
        self.reference: ReferenceStats | None = None  # None: rFID against the originals
        self.reference_path: Path | None = None
        self.reference_sha256: str | None = None
        if reference_stats is not None:
            self.reference_path = Path(reference_stats).expanduser()
            self.reference = ReferenceStats.load(self.reference_path)
            self.reference_sha256 = sha256_of(self.reference_path)
        self.inception = LoadedInception.load(weights, feature_batch)
        if self.reference is not None and self.reference.weights_sha256 not in (None, self.inception.sha256):
            raise WeightsError(
                f"fid: {self.reference_path} was computed with Inception weights SHA-256 "
                f"{self.reference.weights_sha256}, but the weights loaded now have {self.inception.sha256}; "
                f"FID between different feature networks is meaningless"
            )
        from torchmetrics.image.fid import FrechetInceptionDistance  # seconds to import: only when FID runs

        self._fid = FrechetInceptionDistance(
            feature=self.inception.features, normalize=True, reset_real_features=True
        )
        self._images = 0  # N of the last compute (all ranks); until then, this rank's count
        self._device: torch.device | None = None

    def reference_statistics(self, batches: Iterable[Tensor], source: str) -> ReferenceStats:
        """Statistics of ``batches`` with this metric's network (``ngkit eval stats``)."""
        return compute_reference_stats(batches, source=source, inception=self.inception)

    def update(self, batch: EvalBatch) -> None:
        if self._device != batch.images.device:
            self._device = batch.images.device
            self._fid.to(self._device)
        if self.reference is None:
            self._fid.update(batch.images, real=True)
        self._fid.update(batch.reconstructions, real=False)
        self._images += batch.images.shape[0]

    def compute(self) -> dict[str, float]:
        with self._fid.sync_context():  # sums over all ranks, restored to this rank's afterwards
            self._images = int(self._fid.fake_features_num_samples)
            fake = gaussian_of(self._fid.fake_features_sum, self._fid.fake_features_cov_sum, self._images)
            if self.reference is None:
                n_real = int(self._fid.real_features_num_samples)
                real = gaussian_of(self._fid.real_features_sum, self._fid.real_features_cov_sum, n_real)
            else:
                real = (torch.from_numpy(self.reference.mu), torch.from_numpy(self.reference.sigma))
        return {"fid": frechet_distance(fake[0].cpu(), fake[1].cpu(), real[0].cpu(), real[1].cpu())}

    def protocol(self) -> dict[str, Any]:
        if self.reference is None:
            mode = ("generation FID: N samples of a prior vs N held-out images" if self.mode == "generation"
                    else "rFID: reconstructions vs originals of the same N images")
            reference: dict[str, Any] = {}
        else:
            mode = f"FID vs reference statistics {self.reference_path}"
            reference = {
                "reference_file": str(self.reference_path),
                "reference_sha256": self.reference_sha256,
                "reference_images": self.reference.n,
                "reference_protocol": self.reference.protocol,
            }
        return {
            "metric": "fid",
            "mode": mode,
            "images": self._images,
            **reference,
            "resize": RESIZE,
            **self.inception.describe(),
            "statistics": "float64 mean and unbiased covariance; Fréchet distance in float64",
            "versions": versions(),
        }


@hookimpl
def register_metrics(register: Register) -> None:
    register("fid", FidMetric)
