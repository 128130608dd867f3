"""``[data] channels``: grey images as RGB or RGB images as grey, for any dataset plugin.

A dataset that cannot make the channels a recipe asks for itself is wrapped in
:class:`WithChannels`, which converts each image as it is loaded (so examples stay lazy) and
derives the pixel statistics the models standardise with from the dataset's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ngkit.components import Example, ImageDataset, ImageSpec

# ITU-R BT.601 luma, the weights of PIL's convert("L") (and so of the hf plugin's grey decode).
LUMA = (0.299, 0.587, 0.114)


def convert(img: Tensor, channels: int) -> Tensor:
    """``[C, H, W]`` (or ``[B, C, H, W]``) with C in {1, 3} -> ``channels`` channels: grey is
    repeated to RGB, RGB is reduced to its luma."""
    axis = img.dim() - 3
    have = img.shape[axis]
    if have == channels:
        return img
    if have == 1:
        return img.repeat_interleave(channels, dim=axis)
    weights = torch.tensor(LUMA, dtype=img.dtype, device=img.device).view(3, 1, 1)
    return (img * weights).sum(axis, keepdim=True)


def converted_spec(spec: ImageSpec, channels: int) -> ImageSpec:
    """The spec of converted images. Grey -> RGB repeats the mean and std for every channel.
    RGB -> grey: the mean is exact (luma is linear); the std is that of perfectly correlated
    channels (sum of w_i std_i), an upper bound, close for photos."""
    if channels == spec.channels:
        return spec
    if spec.channels == 1:
        return replace(spec, channels=channels, mean=spec.mean[:1] * channels, std=spec.std[:1] * channels)

    def luma(values: tuple[float, ...]) -> tuple[float]:
        full = values * 3 if len(values) == 1 else values
        return (sum(w * v for w, v in zip(LUMA, full)),)

    return replace(spec, channels=1, mean=luma(spec.mean), std=luma(spec.std))


def _load(load: Any, channels: int) -> Tensor:
    img = load()
    if img.dtype == torch.uint8 and img.shape[0] != 1:  # luma weights are float: to [0, 1] first
        img = img.to(torch.float32).div_(255.0)
    return convert(img, channels)  # grey repeated stays uint8 (the core converts the batch)


class WithChannels:
    """``dataset`` with every image converted to ``channels`` channels (1 or 3)."""

    def __init__(self, dataset: ImageDataset, channels: int) -> None:
        self.dataset, self.channels = dataset, channels
        self.spec = converted_spec(dataset.spec, channels)
        self.endless = getattr(dataset, "endless", False)
        if hasattr(dataset, "labelled"):
            self.labelled = self._labelled

    def train(self, *, seed: int, epoch: int, shard: int, num_shards: int, start: int = 0) -> Iterator[Example]:
        for ex in self.dataset.train(seed=seed, epoch=epoch, shard=shard, num_shards=num_shards, start=start):
            yield Example(partial(_load, ex.load, self.channels), ex.name)

    def test(self, *, shard: int, num_shards: int, limit: int | None) -> Iterator[Tensor]:
        for img in self.dataset.test(shard=shard, num_shards=num_shards, limit=limit):
            yield convert(img, self.channels)

    def _labelled(self, split: str) -> Iterator[tuple[Tensor, int]]:
        for img, label in self.dataset.labelled(split):  # type: ignore[attr-defined]
            yield convert(img, self.channels), label
