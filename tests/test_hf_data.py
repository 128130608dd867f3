"""The HF ``datasets`` plugin on imagefolders and parquet shards the tests write (offline), and
the core's batching of it: sharding by rank x worker, positions, unreadable images."""

from __future__ import annotations

import itertools
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from image_sets import image_id, write_imagefolder, write_parquet
from ngkit.data import Position, TrainBatches, check_dataset, pixels
from ngkit.errors import DataError
from ngkit_plugins.hf_data import HFImages


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("imgs"), train=6, validation=5)


def first_epoch(data, shard=0, num_shards=1):
    """Epoch 0's training images as the core's batches see them (uint8 examples, x / 255)."""
    return [pixels(e.load()) for e in data.train(seed=0, epoch=0, shard=shard, num_shards=num_shards)]


def test_train_epoch_is_resized_and_in_range(folder):
    data = HFImages(path="imagefolder", data_dir=str(folder), image_size=32)
    assert all(e.load().dtype == torch.uint8 for e in data.train(seed=0, epoch=0, shard=0, num_shards=1))
    images = first_epoch(data)
    assert len(images) == 6
    assert all(img.shape == (3, 32, 32) and img.dtype == torch.float32 for img in images)
    assert all(0 <= img.min() and img.max() <= 1 for img in images)
    assert data.spec.shape == (3, 32, 32)


def test_test_split_is_deterministic_and_strided(folder):
    data = HFImages(path="imagefolder", data_dir=str(folder), image_size=32)
    full = list(data.test(shard=0, num_shards=1, limit=None))
    again = list(data.test(shard=0, num_shards=1, limit=None))
    assert len(full) == 5 and all(torch.equal(a, b) for a, b in zip(full, again))
    shards = [list(data.test(shard=r, num_shards=2, limit=4)) for r in range(2)]
    assert [len(s) for s in shards] == [2, 2]
    assert torch.equal(shards[1][0], full[1]) and torch.equal(shards[1][1], full[3])


@pytest.mark.parametrize("shards", [1, 3, 8])
def test_every_example_once_per_epoch_across_two_ranks_and_two_workers(tmp_path, shards):
    """24 examples, 2 ranks x 2 DataLoader workers, batch 4: each rank's shard is 12 examples,
    so 3 batches per rank are exactly epoch 0; each example must appear exactly once."""
    data = HFImages(path="parquet", data_dir=str(write_parquet(tmp_path, 24, shards)), image_size=8, flip=False)
    seen = Counter()
    for rank in range(2):
        batches = TrainBatches(data, 4, seed=3, rank=rank, world=2, workers=2)
        for _ in range(3):
            seen.update(image_id(img) for img in next(batches))
        assert batches.position == Position(0, 12)
    assert sorted(seen) == list(range(24)) and set(seen.values()) == {1}


def test_batches_do_not_depend_on_workers_and_resume_at_their_position(tmp_path):
    data = HFImages(path="parquet", data_dir=str(write_parquet(tmp_path, 20, 3)), image_size=8)
    plain = TrainBatches(data, 3, seed=1, rank=0, world=1, workers=0)
    first = [next(plain) for _ in range(9)]  # 27 images: crosses into epoch 1
    pooled = TrainBatches(data, 3, seed=1, rank=0, world=1, workers=2)
    assert all(torch.equal(a, next(pooled)) for a in first)  # crops and flips identical too
    middle = TrainBatches(data, 3, seed=1, rank=0, world=1, workers=0)
    for _ in range(4):
        next(middle)
    resumed = TrainBatches(data, 3, seed=1, rank=0, world=1, workers=2, position=middle.position)
    assert all(torch.equal(a, next(resumed)) for a in first[4:])


def test_empty_train_split_is_a_clear_error(tmp_path):
    write_imagefolder(tmp_path, train=0, validation=2)
    (tmp_path / "train" / "notes.txt").write_text("no images here")
    data = HFImages(path="imagefolder", data_dir=str(tmp_path), image_size=8)
    with pytest.raises(DataError, match="no training examples|cannot load"):
        check_dataset(data, seed=0, rank=0, world=1)


def test_missing_split_and_column_are_clear_errors(folder, tmp_path):
    with pytest.raises(DataError, match="split 'holdout'"):
        check_dataset(HFImages(path="imagefolder", data_dir=str(folder), test_split="holdout"), 0, 0, 1)
    with pytest.raises(DataError, match="no column 'pixels'.*image_column"):
        check_dataset(HFImages(path="imagefolder", data_dir=str(folder), image_column="pixels"), 0, 0, 1)
    with pytest.raises(DataError, match="cannot load"):
        check_dataset(HFImages(path="imagefolder", data_dir=str(tmp_path / "nope")), 0, 0, 1)


def _with_corrupt(folder: Path, tmp_path: Path, bad: int) -> Path:
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    for p in (folder / "train").iterdir():
        (root / "train" / p.name).write_bytes(p.read_bytes())
    for i in range(bad):
        (root / "train" / f"zz-corrupt-{i}.png").write_bytes(b"\x89PNG not really")
    return root


def test_unreadable_images_are_named_once_and_counted_per_file(folder, tmp_path):
    data = HFImages(path="imagefolder", data_dir=str(_with_corrupt(folder, tmp_path, 1)), image_size=32)
    batches = TrainBatches(data, 2, seed=0, rank=0, world=1, max_unreadable=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = [img for _ in range(10) for img in next(batches)]  # 20 of 7 files: ~3 epochs
    # a batch loses only its unreadable example: read 20, the corrupt file among them 2 or 3 times
    assert batches.read == 20 and len(images) in (17, 18)
    named = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert len(named) == 1 and "zz-corrupt-0.png" in named[0]
    assert len(batches.unreadable) == 1


def test_too_many_unreadable_files_stop_with_a_clear_error(folder, tmp_path):
    data = HFImages(path="imagefolder", data_dir=str(_with_corrupt(folder, tmp_path, 4)), image_size=8)
    batches = TrainBatches(data, 2, seed=0, rank=0, world=1, max_unreadable=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="max_unreadable") as err:
            for _ in range(20):
                next(batches)
    assert "zz-corrupt" in str(err.value)


def test_sixteen_bit_png_keeps_its_grey_level(tmp_path):
    (tmp_path / "train").mkdir()
    level = 20000  # of 65535: 0.305
    Image.fromarray(np.full((16, 16), level, dtype=np.uint16)).save(tmp_path / "train" / "deep.png")
    for channels in (None, 3):
        data = HFImages(path="imagefolder", data_dir=str(tmp_path), image_size=8, flip=False, channels=channels)
        (img,) = first_epoch(data)
        assert img.shape == (channels or 1, 8, 8) and data.spec.shape == img.shape
        assert float(img.mean()) == pytest.approx(level / 65535, abs=1 / 255)


def test_grey_sets_stay_grey_and_channels_convert(tmp_path):
    """A folder of "L" PNGs is detected as 1 channel (not 3 copies of it); ``channels = 1`` on an
    RGB folder gives PIL's luma, ``channels = 3`` on the grey one repeats the grey level."""
    rng = np.random.default_rng(1)
    grey, rgb = tmp_path / "grey", tmp_path / "rgb"
    for root, shape in ((grey, (12, 12)), (rgb, (12, 12, 3))):
        for split in ("train", "validation"):
            (root / split).mkdir(parents=True)
            for i in range(2):
                Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(root / split / f"{i}.png")
    data = HFImages(path="imagefolder", data_dir=str(grey), image_size=12, flip=False)
    assert data.spec.channels == 1 and len(data.spec.mean) == 1
    want = sorted(np.asarray(Image.open(p), dtype=np.float32).sum() / 255 for p in (grey / "train").iterdir())
    got = sorted(float(img.sum()) for img in first_epoch(data))
    assert all(img.shape == (1, 12, 12) for img in first_epoch(data)) and got == pytest.approx(want, rel=1e-6)
    as_rgb = HFImages(path="imagefolder", data_dir=str(grey), image_size=12, flip=False, channels=3)
    held_out = next(iter(as_rgb.test(shard=0, num_shards=1, limit=1)))
    assert held_out.shape == (3, 12, 12) and torch.equal(held_out[0], held_out[2])
    assert HFImages(path="imagefolder", data_dir=str(rgb), image_size=12).spec.channels == 3
    as_grey = HFImages(path="imagefolder", data_dir=str(rgb), image_size=12, channels=1)
    first = sorted((rgb / "validation").iterdir())[0]
    luma = np.asarray(Image.open(first).convert("L"), dtype=np.float32) / 255
    assert np.array_equal(next(iter(as_grey.test(shard=0, num_shards=1, limit=1)))[0].numpy(), luma)


def test_an_epoch_of_a_small_stream_is_cheap(tmp_path):
    """The split is loaded once per process, not once per epoch."""
    data = HFImages(path="parquet", data_dir=str(write_parquet(tmp_path, 6, 2)), image_size=8)
    list(itertools.islice(data.train(seed=0, epoch=0, shard=0, num_shards=1), 1))
    loaded = data._loaded["train"]
    for epoch in range(1, 4):
        assert len(list(data.train(seed=0, epoch=epoch, shard=0, num_shards=1))) == 6
    assert data._loaded["train"] is loaded


class _PoisonedSet:
    """Eight 2x2 grey images, the sixth and seventh NaN-poisoned."""

    def __init__(self) -> None:
        from ngkit.components import ImageSpec

        self.spec = ImageSpec(1, 2, 2)

    def train(self, *, seed: int, epoch: int, shard: int, num_shards: int, start: int = 0):
        from ngkit.components import Example

        for i in range(start, 8):
            img = torch.full((1, 2, 2), float("nan") if i in (5, 6) else 0.5)
            yield Example(lambda img=img: img, f"img-{i}")

    def test(self, *, shard: int, num_shards: int, limit: int | None):
        yield from ()


def test_a_non_finite_image_is_named_when_its_batch_is_checked():
    """The training batches check pixel values once per batch; the error still names the first
    non-finite image, as the per-image check did, and batches before it are delivered."""
    stream = TrainBatches(_PoisonedSet(), 4, seed=0, rank=0, world=1)
    assert torch.equal(next(stream), torch.full((4, 1, 2, 2), 0.5))
    with pytest.raises(DataError, match="training image 'img-5' of rank 0 has non-finite pixels"):
        next(stream)
