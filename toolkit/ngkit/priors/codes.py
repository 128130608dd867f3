"""The training data of a prior: a frozen tokenizer's codes of a labelled image dataset.

The engine's batches are image-shaped (``[B, C, H, W]`` floats of the dataset's spec), so each
training example is the tokenizer's image shape holding, in its first ``L + 1`` values, the
``L`` codes and the class label (exact in float32; in bf16 up to 256, checked by
:func:`check_precision`). The held-out split is the dataset's real held-out images: the prior's
evaluation compares its samples with them.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import numpy as np
import torch
from torch import Tensor

from ngkit.components import Example, ImageDataset
from ngkit.errors import DataError, RecipeError
from ngkit.tokenizer import Tokenizer

ENCODE_BATCH = 256


def _split(dataset: ImageDataset, split: str) -> tuple[list[Tensor], list[int] | None]:
    """Every image of a split once, with labels where the dataset has them."""
    labelled = getattr(dataset, "labelled", None)
    if labelled is not None:
        pairs = list(labelled(split))
        return [img for img, _ in pairs], [int(label) for _, label in pairs]
    if split == "test":
        return list(dataset.test(shard=0, num_shards=1, limit=None)), None
    if getattr(dataset, "endless", False):
        raise DataError("a prior needs a dataset with a finite training split (this one draws images forever)")
    from ngkit.data import pixels

    return [pixels(ex.load()) for ex in dataset.train(seed=0, epoch=0, shard=0, num_shards=1)], None


def encode_all(tokenizer: Tokenizer, images: list[Tensor]) -> Tensor:
    """Deterministic codes ``[N, L]`` of a list of images."""
    return torch.cat(list(tokenizer.encode_batch(images, batch_size=ENCODE_BATCH))).cpu().long()


class CodeDataset:
    """A labelled image dataset seen through a frozen tokenizer (an ``ImageDataset`` for the engine)."""

    def __init__(self, tokenizer: Tokenizer, images: ImageDataset) -> None:
        if tuple(images.spec.shape) != tuple(tokenizer.image.shape):
            raise DataError(
                f"the dataset's images are {list(images.spec.shape)} but the tokenizer takes "
                f"{list(tokenizer.image.shape)}; use the dataset (and options) the tokenizer was trained on"
            )
        self.spec = tokenizer.image
        self.latent = tokenizer.latent
        if self.latent.tokens + 1 > int(np.prod(self.spec.shape)):
            raise DataError(f"{self.latent.tokens} codes and a label do not fit in a {list(self.spec.shape)} example")
        train_images, train_labels = _split(images, "train")
        self.test_images, test_labels = _split(images, "test")
        self.codes = encode_all(tokenizer, train_images)
        self.test_codes = encode_all(tokenizer, self.test_images)
        self.classes = 0 if train_labels is None else max(train_labels) + 1
        if train_labels is not None and min(train_labels) < 0:
            raise DataError("class labels must be integers 0, 1, ...; found a negative one")
        null = self.classes  # the prior's "no label"
        self.labels = torch.tensor(train_labels if train_labels is not None else [null] * len(self.codes))
        self.test_labels = torch.tensor(test_labels if test_labels is not None else [null] * len(self.test_codes))
        self.train_images = torch.stack(train_images)

    def emitted(self) -> Tensor:
        """``[V]`` bool: the codes the tokenizer emitted on the training images."""
        return torch.bincount(self.codes.flatten(), minlength=self.latent.codes) > 0

    def example(self, index: int) -> Tensor:
        flat = torch.zeros(self.spec.num_pixels)
        flat[: self.latent.tokens] = self.codes[index].float()
        flat[self.latent.tokens] = float(self.labels[index])
        return flat.view(self.spec.shape)

    def train(self, *, seed: int, epoch: int, shard: int, num_shards: int, start: int = 0) -> Iterator[Example]:
        order = np.random.default_rng([seed, epoch]).permutation(len(self.codes))[shard::num_shards]
        for i in order[start:]:
            yield Example(partial(self.example, int(i)), f"codes of training image {int(i)}")

    def test(self, *, shard: int, num_shards: int, limit: int | None) -> Iterator[Tensor]:
        yield from self.test_images[:limit][shard::num_shards]


def unpack(x: Tensor, tokens: int) -> tuple[Tensor, Tensor]:
    """Codes ``[B, L]`` and labels ``[B]`` (long) from a batch of packed examples."""
    rows = x.detach().flatten(1)[:, : tokens + 1].float().round().long()
    return rows[:, :tokens], rows[:, tokens]


def check_precision(precision: str, codes: int, classes: int, source: str) -> None:
    """Packed codes and labels must be exact in the training precision."""
    exact = {"fp32": 2**24, "bf16": 2**8, "fp16": 2**11}[precision]
    if max(codes, classes + 1) > exact:
        raise RecipeError(source, [
            f"[distributed.precision] {precision} cannot hold codes up to {codes - 1} exactly (the prior's "
            f"batches carry codes as numbers); use precision = \"fp32\""
        ])
