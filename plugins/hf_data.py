"""Any image dataset that HF ``datasets`` can load, streamed: ImageNet from the hub, an
``imagefolder`` on disk, parquet shards. Images are decoded here (not by ``datasets``) so that a
corrupt file is skipped with a count instead of killing a long run.

    [data]
    name = "hf"
    path = "ILSVRC/imagenet-1k"      # or "imagefolder" with data_dir = "/data/imagenet"
    image_size = 256
"""

from __future__ import annotations

import io
import itertools
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ngkit import hookimpl
from ngkit.components import ImageSpec
from ngkit.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _open(value: Any) -> Image.Image:
    """An undecoded ``datasets`` Image value ({"bytes", "path"}) or a PIL image -> RGB PIL."""
    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, dict) and value.get("bytes") is not None:
        img = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict) and value.get("path"):
        img = Image.open(value["path"])
    else:
        raise ValueError(f"not an image value: {type(value).__name__}")
    img.load()
    return img.convert("RGB")


def _resize_crop(img: Image.Image, size: int, rng: np.random.Generator | None, flip: bool) -> Tensor:
    """Shorter side to ``size`` (bicubic, antialiased), then a random (train) or centre crop."""
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    if rng is None:
        left, top = (w - size) // 2, (h - size) // 2
    else:
        left, top = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    if rng is not None and flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class HFImages:
    """A streamed HF dataset split into train and held-out images of ``image_size`` squared."""

    def __init__(
        self,
        path: str,
        name: str | None = None,
        data_dir: str | None = None,
        train_split: str = "train",
        test_split: str = "validation",
        image_column: str = "image",
        image_size: int = 256,
        streaming: bool = True,
        shuffle_buffer: int = 1000,
        flip: bool = True,
        max_corrupt: int = 100,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        self.load_args = {"path": path, "name": name, "data_dir": data_dir, "streaming": streaming}
        self.train_split, self.test_split, self.column = train_split, test_split, image_column
        self.size, self.buffer, self.flip, self.max_corrupt = image_size, shuffle_buffer, flip, max_corrupt
        self.spec = ImageSpec(3, image_size, image_size, tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD))

    def _split(self, split: str, rank: int, world_size: int) -> Any:
        import datasets
        from datasets.distributed import split_dataset_by_node

        try:
            ds = datasets.load_dataset(**{k: v for k, v in self.load_args.items() if v is not None}, split=split)
        except Exception as exc:
            raise DataError(
                f"hf: cannot load {self.load_args['path']!r} split {split!r}: {type(exc).__name__}: {exc}. "
                f"Check path/name/data_dir, that the split exists, and network access for hub datasets "
                f"(HF_DATASETS_OFFLINE=1 allows only local data)"
            ) from exc
        if self.column not in (ds.column_names or [self.column]):
            raise DataError(f"hf: split {split!r} has no column {self.column!r}; columns: {ds.column_names}")
        ds = ds.cast_column(self.column, datasets.Image(decode=False))
        return split_dataset_by_node(ds, rank=rank, world_size=world_size) if world_size > 1 else ds

    def train(self, *, seed: int, rank: int, world_size: int) -> Iterator[Tensor]:
        ds = self._split(self.train_split, rank, world_size)
        rng = np.random.default_rng([seed, rank])
        corrupt = 0
        for epoch in itertools.count():
            shuffled = ds.shuffle(seed=seed + epoch, buffer_size=self.buffer) if hasattr(ds, "set_epoch") else ds.shuffle(seed=seed + epoch)
            for example in shuffled:
                try:
                    yield _resize_crop(_open(example[self.column]), self.size, rng, self.flip)
                except Exception as exc:  # a corrupt image: skip it, but not without limit
                    corrupt += 1
                    warnings.warn(f"hf: skipped an unreadable training image ({exc})", stacklevel=2)
                    if corrupt > self.max_corrupt:
                        raise DataError(
                            f"hf: more than {self.max_corrupt} unreadable training images; the data look "
                            f"corrupt (raise [data] max_corrupt to tolerate more)"
                        ) from exc

    def test(self, *, rank: int, world_size: int, limit: int | None) -> Iterator[Tensor]:
        ds = self._split(self.test_split, 0, 1)
        for i, example in enumerate(itertools.islice(ds, limit)):
            if i % world_size != rank:
                continue
            try:
                yield _resize_crop(_open(example[self.column]), self.size, None, False)
            except Exception as exc:
                raise DataError(
                    f"hf: held-out image {i} of split {self.test_split!r} is unreadable ({exc}); held-out "
                    f"images are never skipped silently, so remove or repair it"
                ) from exc


@hookimpl
def register_datasets(register) -> None:
    register("hf", HFImages)
