"""Batches from a dataset plugin: sharded by rank, split by DataLoader worker, resumable.

Rank ``r`` of ``R`` reads shard ``r`` of ``R`` of each epoch (the dataset partitions the epoch, see
:class:`ngkit.components.ImageDataset`). Within a rank, batch ``b`` is examples ``[bB, (b+1)B)`` of
that shard's stream (epochs back to back) and is decoded by worker ``b mod W``; the other workers
skip those examples without decoding them. So:

- nothing is duplicated or dropped within an epoch, whatever the counts of shards, ranks and
  workers; a worker never waits on an empty shard of its own;
- the batches do not depend on the number of workers, and with a dataset that strides its
  examples, the global batch does not depend on the number of ranks;
- the position of the next batch, ``(epoch, start)``, is all a checkpoint needs to resume.

Unreadable examples (a corrupt file) are dropped from their batch, named once, and counted per
distinct name; too many of them, as a fraction of the examples read, stop the run.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ngkit.components import Example, ImageDataset
from ngkit.errors import ContractError, DataError, NgkitError, PluginError

# What a worker's error record is raised as in the trainer (any other ngkit error: NgkitError).
_ERRORS: dict[str, type[NgkitError]] = {"DataError": DataError, "PluginError": PluginError}


def who_built(component: Any) -> str:
    """``dataset "lfw" (plugin lfw (package ngkit-lfw 1.0)) at [data]``, or its class for a
    component no recipe built."""
    from ngkit.binding import built_at, component_label

    found = built_at(component)
    if found is None:
        return f"{type(component).__module__}:{type(component).__qualname__}"
    where, registration = found
    return f"{component_label(registration)} at [{where}]"


def raised_in(who: str, exc: BaseException, doing: str) -> str:
    """One message for an exception a plugin's code raised: who, doing what, where in its code."""
    tb, at = exc.__traceback__, ""
    while tb is not None:
        at = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno} in {tb.tb_frame.f_code.co_name}"
        tb = tb.tb_next
    return (f"{who} raised {type(exc).__name__}: {exc} {doing}" + (f"\n  raised at {at}" if at else "")
            + "\n  (fix the plugin; ngkit --debug shows ngkit's side of the traceback)")


@dataclass(frozen=True)
class Position:
    """Where a rank's training stream resumes: example ``start`` of its shard of ``epoch``."""

    epoch: int = 0
    start: int = 0


def pixels(img: Tensor) -> Tensor:
    """A dataset's image as float in [0, 1]: uint8 (0-255, what ``Example.load`` may return) is
    divided by 255 in float32, anything else is cast to float."""
    return img.to(torch.float32).div_(255.0) if img.dtype == torch.uint8 else img.float()


def _check(img: Any, shape: tuple[int, ...], where: str, values: bool = True, raw: bool = False) -> Tensor:
    """``img`` as a float tensor of ``shape`` (``raw``: as it came, uint8 or float, for
    :func:`_stack`); ``values``: also refuse non-finite pixels (the training batches check those
    once per batch instead, :func:`_check_values`)."""
    if not isinstance(img, Tensor):
        raise DataError(f"{where} is a {type(img).__name__}, expected a [C, H, W] float or uint8 tensor")
    if tuple(img.shape) != shape:
        raise DataError(f"{where} has shape {tuple(img.shape)}, expected {shape}")
    if values and not _finite(img):
        raise DataError(f"{where} has non-finite pixels (corrupt data?)")
    return img if raw else pixels(img)


def _stack(images: list[Tensor], shape: tuple[int, ...]) -> Tensor:
    """``[B, *shape]`` float32: each image converted straight into its place in the batch (a
    uint8 one divided by 255, the same float32 values as :func:`pixels`), no per-image float
    copy and no second pass to stack (0.6 ms of a 256x256 crop's ~3.5 ms; benchmarks/data.py)."""
    out = torch.empty((len(images), *shape), dtype=torch.float32)
    for slot, img in zip(out, images):
        if img.dtype == torch.uint8:
            torch.div(img, 255.0, out=slot)
        else:
            slot.copy_(img)
    return out


def _finite(img: Tensor) -> bool:
    # NaN propagates to both ends and an infinity shows at one: one pass, 10x cheaper than
    # isfinite(img).all(), which builds a mask (0.4 ms of a 256x256 crop's ~3 ms; benchmarks/data.py)
    return not img.numel() or all(math.isfinite(v) for v in torch.aminmax(img.float()))


def _check_values(batch: Tensor, wheres: list[str]) -> None:
    """One pass over the stacked batch; when it is not finite, the first image that is not is
    named, as a check per image would have named it."""
    if not _finite(batch):
        bad = next(i for i, img in enumerate(batch) if not _finite(img))
        raise DataError(f"{wheres[bad]} has non-finite pixels (corrupt data?)")


def shard_examples(
    dataset: ImageDataset, seed: int, rank: int, world: int, position: Position
) -> Iterator[tuple[Example, Position]]:
    """This rank's examples from ``position`` on, epoch after epoch, each with the position after it."""
    epoch, start = position.epoch, position.start
    while True:
        count = 0
        for i, example in enumerate(
            dataset.train(seed=seed, epoch=epoch, shard=rank, num_shards=world, start=start), start
        ):
            count += 1
            yield example, Position(epoch, i + 1)
        if count == 0 and start == 0:
            raise DataError(
                f"rank {rank} of {world} got no training examples in epoch {epoch}: the dataset has "
                f"fewer training examples than ranks, or its train split is empty"
            )
        epoch, start = epoch + 1, 0


class _Batches(IterableDataset):
    """Runs in each DataLoader worker (or in the main process without workers)."""

    def __init__(self, dataset: ImageDataset, batch_size: int, seed: int, rank: int, world: int, position: Position):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world, self.position = rank, world, position
        self.shape = tuple(dataset.spec.shape)
        self.who = who_built(dataset)  # read here: a spawned worker does not know the recipe

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The batches, or once a record of the exception the dataset raised: a DataLoader worker
        would re-raise it as a traceback in a string, without the plugin that raised it."""
        try:
            yield from self._batches()
        except NgkitError as exc:
            yield {"error": str(exc), "type": type(exc).__name__}
        except Exception as exc:
            yield {"error": raised_in(self.who, exc, "while reading training data"), "type": "PluginError"}

    def _batches(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = shard_examples(self.dataset, self.seed, self.rank, self.world, self.position)
        for b in itertools.count():
            chunk = list(itertools.islice(stream, self.batch_size))
            if b % workers != worker:
                continue  # another worker decodes this batch
            images, bad, wheres = [], [], []
            for example, _ in chunk:
                name = example.name or f"example of epoch {chunk[0][1].epoch}"
                try:
                    img = example.load()
                except ContractError:  # the plugin breaks its declared contract: not a bad file
                    raise
                except Exception as exc:  # an unreadable file: dropped here, counted by the trainer
                    bad.append((name, f"{type(exc).__name__}: {exc}"))
                    continue
                wheres.append(f"training image {name!r} of rank {self.rank}")
                images.append(_check(img, self.shape, wheres[-1], values=False, raw=True))
            stacked = _stack(images, self.shape)  # [0, ...] when all were unreadable
            if any(img.dtype != torch.uint8 for img in images):  # uint8 pixels are finite
                _check_values(stacked, wheres)
            yield {"images": stacked, "end": chunk[-1][1], "read": len(chunk), "bad": bad}


@dataclass
class TrainBatches:
    """Endless ``[B, C, H, W]`` batches of one rank's training stream, with its resume position."""

    dataset: ImageDataset
    batch_size: int
    seed: int
    rank: int
    world: int
    workers: int = 0
    position: Position = Position()
    max_unreadable: float = 0.01  # fraction of the examples read
    unreadable: set[str] = field(default_factory=set)
    read: int = 0

    def __post_init__(self) -> None:
        source = _Batches(self.dataset, self.batch_size, self.seed, self.rank, self.world, self.position)
        # A generator of its own: the loader draws its workers' base seed from it, not from the
        # global RNG, whose state (the sampling noise) a resumed run restores exactly.
        generator = torch.Generator().manual_seed(self.seed)
        loader = DataLoader(source, batch_size=None, num_workers=self.workers, persistent_workers=False,
                            prefetch_factor=4 if self.workers else None, generator=generator)
        self._it = iter(loader)

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        while True:
            batch = next(self._it)
            if "error" in batch:
                raise _ERRORS.get(batch["type"], NgkitError)(batch["error"])
            self.position = batch["end"]
            self.read += batch["read"]
            for name, reason in batch["bad"]:
                if name not in self.unreadable:
                    self.unreadable.add(name)
                    warnings.warn(f"skipped unreadable training image {name}: {reason}", stacklevel=2)
            if len(self.unreadable) > max(1, self.max_unreadable * self.read):
                raise DataError(
                    f"{len(self.unreadable)} of {self.read} training examples read so far are unreadable "
                    f"(e.g. {sorted(self.unreadable)[:3]}), more than [data] max_unreadable = "
                    f"{self.max_unreadable}; repair or remove them, or raise the limit"
                )
            if len(batch["images"]):
                return batch["images"]

    def state(self) -> dict[str, int]:
        return {"epoch": self.position.epoch, "start": self.position.start}


def check_dataset(dataset: ImageDataset, seed: int, rank: int, world: int) -> None:
    """Fail before the engine is built when a split is missing, empty or unreachable (an empty
    training shard raises in :func:`shard_examples`)."""
    next(shard_examples(dataset, seed, rank, world, Position()))
    try:
        next(iter(dataset.test(shard=0, num_shards=1, limit=1)))
    except StopIteration:
        raise DataError("the held-out (test) split is empty; evaluation needs held-out images") from None


def test_batches(
    dataset: ImageDataset, batch_size: int, rank: int, world: int, limit: int | None
) -> Iterator[Tensor]:
    """This rank's share (every ``world``-th) of the first ``limit`` held-out images, in batches."""
    shape = tuple(dataset.spec.shape)
    images = dataset.test(shard=rank, num_shards=world, limit=limit)
    checked = (_check(img, shape, f"held-out image {i * world + rank}") for i, img in enumerate(images))
    while batch := list(itertools.islice(checked, batch_size)):
        yield torch.stack(batch)


# Held-out images are split into this many virtual shards (a multiple of it past 8 ranks), each
# read and batched the same way whatever the number of ranks: rank r evaluates shards r, r + W,
# ... So every image is computed in the same batch, at the same place, on 1 rank or 8, and a
# metric's per-image values are bit-identical (only the float64 sums over ranks change order).
EVAL_SHARDS = 8


def eval_shards(world: int) -> int:
    return EVAL_SHARDS * -(-world // EVAL_SHARDS)


def eval_batches(
    dataset: ImageDataset, batch_size: int, rank: int, world: int, limit: int | None
) -> Iterator[tuple[int, int, Tensor]]:
    """``(shard, batch index, images)`` of this rank's virtual shards of the first ``limit``
    held-out images (see :data:`EVAL_SHARDS`)."""
    shards = eval_shards(world)
    shape = tuple(dataset.spec.shape)
    for shard in range(rank, shards, world):
        images = dataset.test(shard=shard, num_shards=shards, limit=limit)
        checked = (_check(img, shape, f"held-out image {i * shards + shard}") for i, img in enumerate(images))
        for index in itertools.count():
            batch = list(itertools.islice(checked, batch_size))
            if not batch:
                break
            yield shard, index, torch.stack(batch)
