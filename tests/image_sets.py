"""Small image sets on disk for the HF ``datasets`` plugin: parquet shards and imagefolders.

Image ``i`` is a constant colour whose red channel is ``i / 255``, so a test can tell which
example a decoded image came from (:func:`image_id`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_image(i: int, size: int = 8) -> Image.Image:
    arr = np.zeros((size, size, 3), dtype=np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = i % 256, (i * 7) % 256, (i * 13) % 256
    return Image.fromarray(arr)


def image_id(img: torch.Tensor) -> int:
    return int(round(float(img[0].mean()) * 255))


def write_parquet(root: Path, train: int, shards: int, validation: int = 8, size: int = 8) -> Path:
    """``root/train-0000k-of-000nn.parquet`` (``shards`` files) and one validation file."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    root.mkdir(parents=True, exist_ok=True)
    for split, n, parts in (("train", train, shards), ("validation", validation, 1)):
        ds = datasets.Dataset.from_dict(
            {"image": [make_image(i, size) for i in range(n)], "label": [i % 10 for i in range(n)]}, features=features
        )
        for k in range(parts):
            ds.shard(parts, k, contiguous=True).to_parquet(str(root / f"{split}-{k:05d}-of-{parts:05d}.parquet"))
    return root


def write_imagefolder(root: Path, train: int, validation: int, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("validation", validation)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = (rng.random((size + 3 * i % 7, size, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(root / split / f"{i}.png")
    return root
