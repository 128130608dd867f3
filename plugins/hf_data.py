"""Any image dataset that HF ``datasets`` can load, streamed: ImageNet from the hub, an
``imagefolder`` on disk, parquet shards. Images are decoded here (not by ``datasets``), lazily,
so the core can skip examples without decoding them and a corrupt file is skipped and named
instead of killing a long run.

    [data]
    name = "hf"
    path = "ILSVRC/imagenet-1k"      # or "imagefolder" with data_dir = "/data/imagenet"
    image_size = 256

Grey datasets stay grey: with ``[data] channels`` unset, the mode of the first training image
decides (grey modes make 1 channel, anything else 3); ``channels = 1`` or ``3`` converts every
image (PIL's luma for grey) and skips that look.

Sharding (see :mod:`ngkit.data`): when the stream's file shards divide evenly among the readers,
reader ``j`` of ``n`` reads shards ``j, j + n, ...`` (no reader reads another's files); otherwise
every reader walks the shuffled stream and keeps examples ``j, j + n, ...``, decoding only those.
Either way each example of an epoch goes to exactly one reader. Crops and flips are drawn from a
generator keyed by the example's place in the epoch, so a resumed run crops the same way.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ngkit import hookimpl
from ngkit.components import Example, ImageSpec
from ngkit.errors import DataError
from ngkit.imaging import decode

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Their ITU-R BT.601 luma (PIL's convert("L") weights 0.299, 0.587, 0.114): the grey default.
IMAGENET_GREY_MEAN = (0.299 * 0.485 + 0.587 * 0.456 + 0.114 * 0.406,)
IMAGENET_GREY_STD = (0.299 * 0.229 + 0.587 * 0.224 + 0.114 * 0.225,)
HIGH_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}  # 16-bit (and 32-bit int) greyscale
GREY_MODES = {"1", "L", "LA", "La", "F", *HIGH_BIT_MODES}
# ``datasets`` sleeps this long (5 s by default) whenever a multi-file parquet stream is closed, to
# let Arrow's reader threads wind down (apache/arrow#45214); it has already joined its own
# prefetch threads by then. At 5 s it costs every epoch of a small dataset, every evaluation that
# reads a prefix of a split, and every data check at start-up.
ARROW_SHUTDOWN_SLEEP_S = 0.25


def _read(value: Any, min_side: int | None = None) -> Image.Image:
    """An undecoded ``datasets`` Image value ({"bytes", "path"}) or a PIL image, loaded; a JPEG
    decoded at the smallest scale whose shorter side is at least ``min_side``
    (:func:`ngkit.imaging.decode`: the fastest installed decoder)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
        return decode(value["bytes"] if value.get("bytes") is not None else value["path"], min_side)
    raise ValueError(f"not an image value: {type(value).__name__}")


def _open(value: Any, channels: int, min_side: int | None = None) -> Image.Image:
    """An image value -> 8-bit PIL, grey ("L") for 1 channel, RGB for 3.

    16-bit greyscale is scaled to 8 bits (a plain ``convert`` would clip it to white); float
    images are taken as [0, 1]; palette, alpha and CMYK images are converted."""
    img = _read(value, min_side)
    if img.mode in HIGH_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64) / 65535.0
        img = Image.fromarray(np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.round(np.clip(np.asarray(img), 0, 1) * 255).astype(np.uint8), "L")
    mode = "L" if channels == 1 else "RGB"
    return img if img.mode == mode else img.convert(mode)  # convert to its own mode would copy


def _resize_crop(img: Image.Image, size: int, rng: np.random.Generator | None, flip: bool) -> Tensor:
    """Shorter side to ``size`` (bicubic, antialiased), then a random (train) or centre crop, as
    a uint8 ``[C, H, W]`` view (training examples are uint8: the core converts once per batch).

    Only the crop is resampled: Pillow's ``resize(box=...)`` with the box in the input that maps
    exactly onto the crop of the resized image (each axis scaled by its own rounded size, as
    the full resize is), so the same separable bicubic filter at the same positions. The pixels
    differ from resizing the whole image and cropping only by the rounding of Pillow's 8-bit
    intermediate image, which the box path takes after the other of its two passes: 1.9 % of
    values by 1-4 /255; against a float64 resampling of the region both paths are off by the
    same mean 0.16 /255, max 4 (tests/test_hf_data.py); 20 % less resize time."""
    w, h = img.size
    scale = size / min(w, h)
    out_w, out_h = max(size, round(w * scale)), max(size, round(h * scale))  # the resized image's size
    if rng is None:
        left, top = (out_w - size) // 2, (out_h - size) // 2
    else:
        left, top = int(rng.integers(0, out_w - size + 1)), int(rng.integers(0, out_h - size + 1))
    sx, sy = w / out_w, h / out_h
    box = (left * sx, top * sy, min(w, (left + size) * sx), min(h, (top + size) * sy))
    img = img.resize((size, size), Image.BICUBIC, box=box)
    if rng is not None and flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = torch.from_numpy(np.array(img))  # uint8 [H, W] or [H, W, C], writable
    arr = arr[..., None] if arr.ndim == 2 else arr  # grey: [H, W] -> [H, W, 1]
    return arr.permute(2, 0, 1)  # a [C, H, W] view: the core converts the whole batch to float once


def _to_float(img: Tensor) -> Tensor:
    """uint8 ``[C, H, W]`` -> contiguous float32 in [0, 1], x / 255 (as the core's batches)."""
    return img.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def _name(value: Any, fallback: str) -> str:
    return (value.get("path") if isinstance(value, dict) else None) or fallback


class HFImages:
    """A streamed HF dataset split into train and held-out images of ``image_size`` squared,
    grey or RGB (``channels``: from ``[data] channels``, else the first training image's mode)."""

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
        mean: list[float] | None = None,
        std: list[float] | None = None,
        channels: int | None = None,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        self.load_args = {"path": path, "name": name, "data_dir": data_dir, "streaming": streaming}
        self.train_split, self.test_split, self.column = train_split, test_split, image_column
        self.size, self.buffer, self.flip = image_size, shuffle_buffer, flip
        self._loaded: dict[str, Any] = {}  # split -> dataset, loaded once per process
        self.channels = channels or self._detect_channels()
        grey = self.channels == 1
        default_mean, default_std = (IMAGENET_GREY_MEAN, IMAGENET_GREY_STD) if grey else (IMAGENET_MEAN, IMAGENET_STD)
        self.spec = ImageSpec(self.channels, image_size, image_size, tuple(mean or default_mean), tuple(std or default_std))

    def _detect_channels(self) -> int:
        """1 if the first training image is greyscale, else 3 (one image read, not decoded further)."""
        value = next(self._values(self._split(self.train_split)), None)
        if value is None:
            return 3  # an empty split: check_dataset reports it
        try:
            mode = _read(value).mode
        except Exception as exc:
            raise DataError(
                f"hf: cannot read the first training image {_name(value, '0')} to tell grey from RGB ({exc}); "
                f"set [data] channels = 1 or 3"
            ) from exc
        return 1 if mode in GREY_MODES else 3

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers load their own copy
        return {**self.__dict__, "_loaded": {}}

    def _split(self, split: str) -> Any:
        if split in self._loaded:
            return self._loaded[split]
        import datasets

        datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = min(datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN, ARROW_SHUTDOWN_SLEEP_S)
        try:
            ds = datasets.load_dataset(**{k: v for k, v in self.load_args.items() if v is not None}, split=split)
        except Exception as exc:
            raise DataError(
                f"hf: cannot load {self.load_args['path']!r} split {split!r}: {type(exc).__name__}: {exc}. "
                f"Check path/name/data_dir, that the split exists, and network access for hub datasets "
                f"(HF_DATASETS_OFFLINE=1 allows only local data)"
            ) from exc
        columns = ds.column_names
        if columns is not None and self.column not in columns:
            raise DataError(
                f"hf: split {split!r} of {self.load_args['path']!r} has no column {self.column!r}; "
                f"set [data] image_column to one of {columns}"
            )
        ds = ds.cast_column(self.column, datasets.Image(decode=False))
        if not hasattr(ds, "set_epoch"):  # a map-style Dataset (streaming = false): stream it
            ds = ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds))))
        self._loaded[split] = ds
        return ds

    def _values(self, ds: Any) -> Iterator[Any]:
        """The image column's raw values. ``iter`` rather than ``__iter__``: inside a DataLoader
        worker the latter would split the shards among workers again, behind the core's back."""
        for rows in ds.iter(batch_size=64):
            yield from rows[self.column]

    def _decode_train(self, value: Any, key: list[int]) -> Tensor:
        return _resize_crop(_open(value, self.channels, self.size), self.size, np.random.default_rng(key), self.flip)

    def train(self, *, seed: int, epoch: int, shard: int, num_shards: int, start: int = 0) -> Iterator[Example]:
        ds = self._split(self.train_split)
        shuffle_seed = (seed * 1_000_003 + epoch) % 2**32
        if ds.num_shards % num_shards == 0:  # whole files per reader
            part = ds.shard(num_shards=num_shards, index=shard, contiguous=False)
            values = itertools.islice(self._values(part.shuffle(seed=shuffle_seed, buffer_size=self.buffer)), start, None)
            keys = ([seed, epoch, num_shards, shard, i] for i in itertools.count(start))
        else:  # every reader walks the stream and keeps its stride
            stream = self._values(ds.shuffle(seed=shuffle_seed, buffer_size=self.buffer))
            first = shard + start * num_shards
            values = itertools.islice(stream, first, None, num_shards)
            keys = ([seed, epoch, g] for g in itertools.count(first, num_shards))
        for value, key in zip(values, keys):
            yield Example(partial(self._decode_train, value, key), _name(value, f"{self.train_split}[{key[-1]}]"))

    def test(self, *, shard: int, num_shards: int, limit: int | None) -> Iterator[Tensor]:
        values = itertools.islice(self._values(self._split(self.test_split)), shard, limit, num_shards)
        for i, value in zip(itertools.count(shard, num_shards), values):
            try:
                yield _to_float(_resize_crop(_open(value, self.channels, self.size), self.size, None, False))
            except Exception as exc:
                raise DataError(
                    f"hf: held-out image {_name(value, str(i))} of split {self.test_split!r} is unreadable "
                    f"({exc}); held-out images are never skipped silently, so remove or repair it"
                ) from exc


@hookimpl
def register_datasets(register) -> None:
    register("hf", HFImages)
