"""Dataset ``shapes``: greyscale squares and discs on a black background, drawn on the fly.

Greyscale is one channel (``ImageSpec(1, size, size, ...)``); pixels are floats in [0, 1].
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from functools import partial

import torch
from torch import Tensor

from ngkit import hookimpl
from ngkit.components import Example, ImageSpec

NGKIT_PLUGIN_API = 3  # the ngkit plugin API this module was written for

TEST_SEED = 12345  # fixed: the held-out images are the same for every run


def draw(gen: torch.Generator, size: int) -> Tensor:
    """One ``[1, size, size]`` image: a filled square or disc of random size, place and brightness."""
    radius = int(torch.randint(size // 8 + 1, size // 3 + 1, (), generator=gen))
    cy, cx = torch.randint(radius, size - radius, (2,), generator=gen).tolist()
    ink = 0.5 + 0.5 * float(torch.rand((), generator=gen))
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    if torch.rand((), generator=gen) < 0.5:
        mask = ((yy - cy).abs() <= radius) & ((xx - cx).abs() <= radius)
    else:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    return (mask.float() * ink).unsqueeze(0)


class Shapes:
    """Endless random training shapes; ``test_images`` fixed held-out ones."""

    def __init__(self, size: int = 16, test_images: int = 64) -> None:
        if size < 8:
            raise ValueError(f"shapes: size must be at least 8, got {size}")
        self.size = size
        gen = torch.Generator().manual_seed(TEST_SEED)
        self.test_set = torch.stack([draw(gen, size) for _ in range(test_images)])
        self.spec = ImageSpec(1, size, size, (float(self.test_set.mean()),), (float(self.test_set.std()),))

    endless = True  # drawn afresh forever

    def _draw(self, seed: int, index: int) -> Tensor:
        return draw(torch.Generator().manual_seed(seed * 1_000_003 + index), self.size)

    def train(self, *, seed: int, epoch: int, shard: int, num_shards: int, start: int = 0) -> Iterator[Example]:
        """Shape ``i`` comes from its own seed, so shard ``j`` of ``n`` takes ``j, j + n, ...``."""
        for i in itertools.count(shard + start * num_shards, num_shards):
            yield Example(partial(self._draw, seed, i), f"shape {i}")

    def test(self, *, shard: int, num_shards: int, limit: int | None) -> Iterator[Tensor]:
        yield from self.test_set[:limit][shard::num_shards]


@hookimpl
def register_datasets(register) -> None:
    register("shapes", Shapes)
