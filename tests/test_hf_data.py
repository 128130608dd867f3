"""The HF ``datasets`` plugin on an imagefolder the test makes (no hub access: offline)."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ngkit.errors import DataError
from ngkit_plugins.hf_data import HFImages


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("validation", 5)):
        (root / split).mkdir()
        for i in range(n):
            size = (40 + 3 * i, 56)  # differently shaped, all larger than the crop
            Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8")).save(root / split / f"{i}.png")
    return root


def test_train_stream_is_endless_resized_and_in_range(folder):
    data = HFImages(path="imagefolder", data_dir=str(folder), image_size=32)
    images = list(itertools.islice(data.train(seed=0, rank=0, world_size=1), 15))  # > 2 epochs
    assert all(img.shape == (3, 32, 32) and img.dtype == torch.float32 for img in images)
    assert all(0 <= img.min() and img.max() <= 1 for img in images)
    assert data.spec.shape == (3, 32, 32)


def test_test_split_is_deterministic_and_sharded(folder):
    data = HFImages(path="imagefolder", data_dir=str(folder), image_size=32)
    full = list(data.test(rank=0, world_size=1, limit=None))
    again = list(data.test(rank=0, world_size=1, limit=None))
    assert len(full) == 5 and all(torch.equal(a, b) for a, b in zip(full, again))
    shards = [list(data.test(rank=r, world_size=2, limit=4)) for r in range(2)]
    assert [len(s) for s in shards] == [2, 2]
    assert torch.equal(shards[1][0], full[1])  # rank 1 gets images 1 and 3


def test_corrupt_training_image_is_skipped_with_a_warning(folder, tmp_path):
    bad = tmp_path / "data"
    (bad / "train").mkdir(parents=True)
    for p in (folder / "train").iterdir():
        (bad / "train" / p.name).write_bytes(p.read_bytes())
    (bad / "train" / "zz-corrupt.png").write_bytes(b"\x89PNG not really")
    data = HFImages(path="imagefolder", data_dir=str(bad), image_size=32, test_split="train")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = list(itertools.islice(data.train(seed=0, rank=0, world_size=1), 12))
    assert len(images) == 12
    assert any("unreadable" in str(w.message) for w in caught)
    with pytest.raises(DataError, match="held-out image"):
        list(data.test(rank=0, world_size=1, limit=None))


def test_too_many_corrupt_images_stop_with_a_clear_error(tmp_path):
    (tmp_path / "train").mkdir()
    for i in range(3):
        (tmp_path / "train" / f"{i}.png").write_bytes(b"garbage")
    data = HFImages(path="imagefolder", data_dir=str(tmp_path), image_size=8, max_corrupt=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="max_corrupt"):
            list(itertools.islice(data.train(seed=0, rank=0, world_size=1), 5))


def test_missing_dataset_is_a_data_error(tmp_path):
    data = HFImages(path="imagefolder", data_dir=str(tmp_path / "nope"), image_size=8)
    with pytest.raises(DataError, match="cannot load"):
        next(iter(data.train(seed=0, rank=0, world_size=1)))
