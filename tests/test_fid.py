"""FID: the Fréchet distance, the FID Inception network and the "fid" metric.

The real Inception weights cannot be downloaded here, so the network runs with random weights
(saved to a file and loaded through ngkit.weights like the real one). That checks everything
except the published feature values.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from skimage import data as skdata

from ngkit import weights
from ngkit.components import EvalBatch, LatentSpec
from ngkit.errors import DataError, NgkitError, WeightsError
from ngkit.plugins import get_registry
from ngkit_plugins.fid_metric import (
    FidMetric,
    InceptionFeatures,
    ReferenceStats,
    compute_reference_stats,
    frechet_distance,
)
from ngkit.metrics.inception import FIDInceptionV3, _avg_pool_tf



pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the Fréchet distance


def scipy_frechet(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """pytorch-fid's formula, written independently: scipy's matrix square root in float64."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(0), np.cov(features, rowvar=False)


@pytest.mark.parametrize("n", [200, 20])  # full-rank, and rank-deficient like N < 2048 images
def test_frechet_distance_matches_scipy_sqrtm(n: int) -> None:
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, 32))
    b = rng.normal(size=(n, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 0.5
    (m1, s1), (m2, s2) = gaussian(a), gaussian(b)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(scipy_frechet(m1, s1, m2, s2), rel=1e-7)


def test_frechet_distance_closed_form_for_diagonal_covariances() -> None:
    # Commuting covariances: FID = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    a, b = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 9.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = 1 + 4 + (1 + 1 + 0 + 0.25)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_is_zero_for_identical_sets_and_symmetric() -> None:
    rng = np.random.default_rng(1)
    m1, s1 = gaussian(rng.normal(size=(30, 64)))  # rank 29 < 64
    m2, s2 = gaussian(rng.gamma(2.0, size=(50, 64)))
    assert abs(frechet_distance(m1, s1, m1, s1)) < 1e-9 * np.trace(s1)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(frechet_distance(m2, s2, m1, s1), rel=1e-9)


# ---------------------------------------------------------------- the network

# The state dict of pytorch-fid's fid_inception_v3() (torchvision's Inception3 with
# num_classes=1008, aux_logits=False and the FIDInception blocks), transcribed from the
# sources of mseitzer/pytorch-fid (src/pytorch_fid/inception.py), pytorch/vision
# (torchvision/models/inception.py) and toshas/torch-fidelity (feature_extractor_inceptionv3.py).
# Each entry: conv name -> (in channels, out channels, kernel height, kernel width).
STEM = {
    "Conv2d_1a_3x3": (3, 32, 3, 3),
    "Conv2d_2a_3x3": (32, 32, 3, 3),
    "Conv2d_2b_3x3": (32, 64, 3, 3),
    "Conv2d_3b_1x1": (64, 80, 1, 1),
    "Conv2d_4a_3x3": (80, 192, 3, 3),
}
I = "in"  # the block's input channels
P = "pool"  # InceptionA's pool_features
C7 = "c7"  # InceptionC's channels_7x7
INCEPTION_A = {
    "branch1x1": (I, 64, 1, 1),
    "branch5x5_1": (I, 48, 1, 1),
    "branch5x5_2": (48, 64, 5, 5),
    "branch3x3dbl_1": (I, 64, 1, 1),
    "branch3x3dbl_2": (64, 96, 3, 3),
    "branch3x3dbl_3": (96, 96, 3, 3),
    "branch_pool": (I, P, 1, 1),
}
INCEPTION_B = {
    "branch3x3": (I, 384, 3, 3),
    "branch3x3dbl_1": (I, 64, 1, 1),
    "branch3x3dbl_2": (64, 96, 3, 3),
    "branch3x3dbl_3": (96, 96, 3, 3),
}
INCEPTION_C = {
    "branch1x1": (I, 192, 1, 1),
    "branch7x7_1": (I, C7, 1, 1),
    "branch7x7_2": (C7, C7, 1, 7),
    "branch7x7_3": (C7, 192, 7, 1),
    "branch7x7dbl_1": (I, C7, 1, 1),
    "branch7x7dbl_2": (C7, C7, 7, 1),
    "branch7x7dbl_3": (C7, C7, 1, 7),
    "branch7x7dbl_4": (C7, C7, 7, 1),
    "branch7x7dbl_5": (C7, 192, 1, 7),
    "branch_pool": (I, 192, 1, 1),
}
INCEPTION_D = {
    "branch3x3_1": (I, 192, 1, 1),
    "branch3x3_2": (192, 320, 3, 3),
    "branch7x7x3_1": (I, 192, 1, 1),
    "branch7x7x3_2": (192, 192, 1, 7),
    "branch7x7x3_3": (192, 192, 7, 1),
    "branch7x7x3_4": (192, 192, 3, 3),
}
INCEPTION_E = {
    "branch1x1": (I, 320, 1, 1),
    "branch3x3_1": (I, 384, 1, 1),
    "branch3x3_2a": (384, 384, 1, 3),
    "branch3x3_2b": (384, 384, 3, 1),
    "branch3x3dbl_1": (I, 448, 1, 1),
    "branch3x3dbl_2": (448, 384, 3, 3),
    "branch3x3dbl_3a": (384, 384, 1, 3),
    "branch3x3dbl_3b": (384, 384, 3, 1),
    "branch_pool": (I, 192, 1, 1),
}
MIXED = {  # block name -> (template, its parameters)
    "Mixed_5b": (INCEPTION_A, {I: 192, P: 32}),
    "Mixed_5c": (INCEPTION_A, {I: 256, P: 64}),
    "Mixed_5d": (INCEPTION_A, {I: 288, P: 64}),
    "Mixed_6a": (INCEPTION_B, {I: 288}),
    "Mixed_6b": (INCEPTION_C, {I: 768, C7: 128}),
    "Mixed_6c": (INCEPTION_C, {I: 768, C7: 160}),
    "Mixed_6d": (INCEPTION_C, {I: 768, C7: 160}),
    "Mixed_6e": (INCEPTION_C, {I: 768, C7: 192}),
    "Mixed_7a": (INCEPTION_D, {I: 768}),
    "Mixed_7b": (INCEPTION_E, {I: 1280}),
    "Mixed_7c": (INCEPTION_E, {I: 2048}),
}


def reference_table() -> dict[str, tuple[int, ...]]:
    convs = dict(STEM)
    for block, (template, params) in MIXED.items():
        for conv, shape in template.items():
            convs[f"{block}.{conv}"] = tuple(params.get(s, s) for s in shape)  # type: ignore[misc]
    table: dict[str, tuple[int, ...]] = {}
    for name, (c_in, c_out, kh, kw) in convs.items():
        table[f"{name}.conv.weight"] = (c_out, c_in, kh, kw)
        for buffer in ("weight", "bias", "running_mean", "running_var"):
            table[f"{name}.bn.{buffer}"] = (c_out,)
        table[f"{name}.bn.num_batches_tracked"] = ()
    table["fc.weight"] = (1008, 2048)
    table["fc.bias"] = (1008,)
    return table


def test_state_dict_names_and_shapes_are_pytorch_fids() -> None:
    table = reference_table()
    assert len(table) == 94 * 6 + 2  # 94 BasicConv2d blocks (conv + 5 batch-norm entries) and fc
    actual = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items()}
    assert sorted(actual) == sorted(table)
    assert actual == table
    assert not any(k.startswith("AuxLogits") for k in actual)


def test_table_fits_the_size_of_the_published_file() -> None:
    # pt_inception-2015-12-05-6726825d.pth is 95,628,359 bytes (as recorded next to its SHA-256
    # by users of the file); its float32 tensors must account for all but the container overhead.
    float_bytes = 4 * sum(int(np.prod(s)) for k, s in reference_table().items() if not k.endswith("tracked"))
    assert 0 < 95_628_359 - float_bytes < 0.002 * 95_628_359


def test_tf_average_pool_ignores_the_padding() -> None:
    # count_include_pad=True would give 4/9 in the corners and 6/9 on the edges.
    assert torch.equal(_avg_pool_tf(torch.ones(1, 2, 5, 5)), torch.ones(1, 2, 5, 5))


def test_network_stays_in_eval_mode_and_has_no_trainable_parameters() -> None:
    network = FIDInceptionV3().train()
    assert not network.training and not any(m.training for m in network.modules())
    assert not any(p.requires_grad for p in network.parameters())


# ---------------------------------------------------------------- weights and the metric


def test_random_weights_without_their_hash_are_rejected(random_weights: Path) -> None:
    with pytest.raises(WeightsError, match="SHA-256"):
        FidMetric(weights=str(random_weights))


def test_wrong_state_dict_names_are_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torchvision's ImageNet Inception3: 1000 classes and an auxiliary classifier.
    state = FIDInceptionV3().state_dict()
    state["fc.weight"] = torch.zeros(1000, 2048)
    state["fc.bias"] = torch.zeros(1000)
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    path = tmp_path / "torchvision-inception.pth"
    torch.save(state, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    spec = replace(weights.KNOWN_WEIGHTS["inception"], sha256=digest)
    monkeypatch.setitem(weights.KNOWN_WEIGHTS, "inception", spec)
    with pytest.raises(WeightsError) as info:
        FidMetric(weights=str(path))
    assert "unexpected keys (1): AuxLogits.fc.weight" in str(info.value)
    assert "fc.weight (1000, 2048) (expected (1008, 2048))" in str(info.value)


def test_missing_weights_say_how_to_provide_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NGKIT_CACHE", str(tmp_path))
    monkeypatch.delenv("NGKIT_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(WeightsError) as info:
        FidMetric()
    sha256 = weights.KNOWN_WEIGHTS["inception"].sha256
    for needed in ("--inception-weights", "NGKIT_INCEPTION_WEIGHTS", str(tmp_path), sha256):
        assert needed in str(info.value)


def test_fid_is_registered() -> None:
    assert get_registry().get("metrics", "fid").factory is FidMetric


@pytest.mark.parametrize(
    "options",
    [{"mode": "reference"}, {"mode": "rfid", "reference_stats": "stats.npz"}, {"mode": "FID"}],
)
def test_inconsistent_options_are_rejected(options: dict[str, str], trusted: Path) -> None:
    with pytest.raises(NgkitError, match="mode"):
        FidMetric(**options)  # type: ignore[arg-type]


def astronaut_crops(n: int, size: int = 32) -> torch.Tensor:
    """n different size x size crops of scikit-image's astronaut photo, [n, 3, size, size] in [0, 1]."""
    photo = torch.from_numpy(skdata.astronaut()).permute(2, 0, 1).float() / 255
    per_row = photo.shape[-1] // size
    corners = [((i // per_row) * size, (i % per_row) * size) for i in range(n)]
    return torch.stack([photo[:, top : top + size, left : left + size] for top, left in corners])


def eval_batch(images: torch.Tensor, reconstructions: torch.Tensor) -> EvalBatch:
    latent = LatentSpec(grid=(2, 2), codes=16)
    return EvalBatch(images, reconstructions, torch.zeros(images.shape[0], 4, dtype=torch.long), latent)


def test_features_are_2048_floats_and_grey_means_rgb_repeated(trusted: Path) -> None:
    network = FIDInceptionV3()
    weights.load_weights("inception", trusted, network)
    features = InceptionFeatures(network, feature_batch=1)
    grey = astronaut_crops(1)[:, :1]
    out = features(grey)
    assert out.shape == (1, 2048) and out.dtype == torch.float64
    assert torch.equal(out, features(grey.repeat(1, 3, 1, 1)))


def test_rfid_is_zero_when_reconstructions_are_the_originals(trusted: Path) -> None:
    images = astronaut_crops(8)
    metric = FidMetric(feature_batch=2)  # batches of 3 run as 2 + 1 through the network
    for chunk in images.split(3):  # uneven batches: the accumulation must not care
        metric.update(eval_batch(chunk, chunk.clone()))
    fid = metric.compute()["fid"]
    assert abs(fid) < 1e-6
    protocol = metric.protocol()
    assert protocol["mode"] == "rFID: reconstructions vs originals of the same N images"
    assert protocol["images"] == 8
    assert protocol["weights_sha256"] == hashlib.sha256(trusted.read_bytes()).hexdigest()
    assert protocol["weights_file"] == trusted.name
    assert "299x299" in protocol["resize"] and "[-1,1]" in protocol["resize"]
    assert set(protocol["versions"]) == {"ngkit", "torch", "torchmetrics"}


def test_reference_mode_agrees_with_rfid_on_the_same_images(trusted: Path, tmp_path: Path) -> None:
    images = astronaut_crops(6)
    noisy = (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)

    stats = compute_reference_stats(images.split(4), source="6 astronaut crops")
    stats.save(tmp_path / "ref.npz")
    loaded = ReferenceStats.load(tmp_path / "ref.npz")
    assert loaded.n == 6 and loaded.weights_sha256 == stats.weights_sha256
    assert loaded.protocol["source"] == "6 astronaut crops"
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)

    against_stats = FidMetric(mode="reference", reference_stats=str(tmp_path / "ref.npz"))
    against_stats.update(eval_batch(images, noisy))
    rfid = FidMetric()
    rfid.update(eval_batch(images, noisy))

    value = against_stats.compute()["fid"]
    assert value > 0
    assert value == pytest.approx(rfid.compute()["fid"], rel=1e-9)
    protocol = against_stats.protocol()
    assert protocol["mode"] == f"FID vs reference statistics {tmp_path / 'ref.npz'}"
    assert protocol["reference_images"] == 6 and protocol["images"] == 6


def test_reference_stats_from_other_weights_are_rejected(trusted: Path, tmp_path: Path) -> None:
    d = 2048
    ReferenceStats(np.zeros(d), np.eye(d), 10, weights_sha256="0" * 64).save(tmp_path / "other.npz")
    with pytest.raises(WeightsError, match="different feature networks"):
        FidMetric(mode="reference", reference_stats=str(tmp_path / "other.npz"))


def test_reference_stats_must_be_inception_statistics(tmp_path: Path) -> None:
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(DataError, match="mu \\[2048\\]"):
        ReferenceStats.load(tmp_path / "small.npz")
    with pytest.raises(DataError, match="not found"):
        ReferenceStats.load(tmp_path / "absent.npz")
