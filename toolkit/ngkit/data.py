"""Batching a dataset plugin's image streams, with shape and finiteness checks per image."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ngkit.components import ImageDataset
from ngkit.errors import DataError


class _Stream(IterableDataset):
    """Splits a rank's share further between DataLoader workers, checking every image."""

    def __init__(self, make: Callable[[int, int], Iterable[Tensor]], rank: int, world: int, shape) -> None:
        self.make, self.rank, self.world, self.shape = make, rank, world, tuple(shape)

    def __iter__(self) -> Iterator[Tensor]:
        info = get_worker_info()
        rank, world = self.rank, self.world
        if info is not None:
            rank, world = rank * info.num_workers + info.id, world * info.num_workers
        for i, img in enumerate(self.make(rank, world)):
            if tuple(img.shape) != self.shape:
                raise DataError(f"image {i} of rank {rank} has shape {tuple(img.shape)}, expected {self.shape}")
            if not torch.isfinite(img).all():
                raise DataError(f"image {i} of rank {rank} has non-finite pixels (corrupt data?)")
            yield img


def train_batches(
    dataset: ImageDataset, batch_size: int, seed: int, rank: int, world: int, workers: int = 0
) -> Iterator[Tensor]:
    """Endless ``[B, C, H, W]`` batches of this rank's training stream."""
    stream = _Stream(lambda r, w: dataset.train(seed=seed, rank=r, world_size=w), rank, world, dataset.spec.shape)
    return iter(DataLoader(stream, batch_size=batch_size, num_workers=workers, drop_last=True))


def test_batches(
    dataset: ImageDataset, batch_size: int, rank: int, world: int, limit: int | None
) -> Iterator[Tensor]:
    """This rank's share of the first ``limit`` held-out images, in batches."""
    stream = _Stream(
        lambda r, w: dataset.test(rank=r, world_size=w, limit=limit), rank, world, dataset.spec.shape
    )
    return iter(DataLoader(stream, batch_size=batch_size))
