"""``ngkit encode``: the codes of a whole dataset split, in shards, with labels where the dataset has them.

    ngkit encode runs/digits --split test --out codes/            # the run's own dataset
    ngkit encode export/ --data digits --out codes/               # a registered dataset, default options
    torchrun --nproc_per_node 4 -m ngkit.cli.main encode export/ --data recipes/x.toml --out codes/

Shard ``i`` holds images ``i*shard_size ...`` of the split, in the dataset's order. A rerun skips
the shards already written (resumable); under ``torchrun`` rank ``r`` writes shards ``r, r+W, ...``.
Files are documented in docs/tokenizer.md.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ngkit.errors import NgkitError

if TYPE_CHECKING:  # torch is imported where it is used: `ngkit --help` needs none of it
    import torch
    from torch import Tensor

    Labelled = Iterator[tuple[Tensor, int | None]]  # (image [C, H, W], label or None)

console = Console(stderr=True)
META = "meta.json"
FORMATS = ("safetensors", "npy")


def shard_files(out: Path, index: int, fmt: str) -> dict[str, Path]:
    """The files of one shard; the ``codes`` file is written last, so its presence marks it done."""
    stem = out / f"shard-{index:05d}"
    if fmt == "safetensors":
        return {"codes": stem.with_suffix(".safetensors")}
    return {"labels": stem.with_suffix(".labels.npy"), "codes": stem.with_suffix(".codes.npy")}


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_shard(out: Path, index: int, fmt: str, codes: Tensor, labels: Tensor | None) -> None:
    files = shard_files(out, index, fmt)
    if fmt == "safetensors":
        from safetensors.torch import save

        tensors = {"codes": codes} if labels is None else {"codes": codes, "labels": labels}
        _write_atomic(files["codes"], lambda p: p.write_bytes(save(tensors)))
        return
    import numpy as np

    def npy(array: Tensor) -> Callable[[Path], None]:
        def write(path: Path) -> None:
            with open(path, "wb") as f:  # a file object: np.save would append .npy to the temporary name
                np.save(f, array.numpy())

        return write

    if labels is not None:
        _write_atomic(files["labels"], npy(labels))
    _write_atomic(files["codes"], npy(codes))


def code_dtype(codes: int) -> torch.dtype:
    """The smallest signed integer type holding codes 0..codes-1 (int16 up to 32,768 codes)."""
    import torch

    return torch.int16 if codes <= 2**15 else torch.int32


def _chunks(items: Iterable[Any], size: int) -> Iterator[Iterator[Any]]:
    """Lazy consecutive chunks of ``size`` items (each must be consumed before the next)."""
    it = iter(items)
    for first in it:
        yield itertools.chain([first], itertools.islice(it, size - 1))


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def dataset_items(dataset: Any, split: str, num_images: int | None, seed: int) -> tuple[Labelled, bool]:
    """(image, label) pairs of a split in a fixed order, and whether labels are real.

    Datasets with a ``labelled(split)`` method give every image once, with labels; otherwise the
    test split is ``test()`` and the train split epoch 0 of the seeded stream (its first
    ``num_images``; a dataset that draws images without end, ``endless = True``, needs that limit)."""
    if hasattr(dataset, "labelled"):
        items: Labelled = iter(dataset.labelled(split))
        return (itertools.islice(items, num_images) if num_images else items), True
    if split == "test":
        return ((x, None) for x in dataset.test(shard=0, num_shards=1, limit=num_images)), False
    if not num_images and getattr(dataset, "endless", False):
        raise NgkitError(
            "this dataset's train split is an endless random stream (it has no labelled() listing); "
            "give --num-images N to encode its first N images"
        )
    stream = dataset.train(seed=seed, epoch=0, shard=0, num_shards=1)
    from ngkit.data import pixels

    return ((pixels(example.load()), None) for example in itertools.islice(stream, num_images)), False


def resolve_dataset(target: Path, data: str | None) -> tuple[Any, dict[str, Any]]:
    """The dataset to encode and its table: ``--data`` (a recipe file or a registered dataset
    name), or the dataset of the run being encoded."""
    from ngkit.binding import build_component, component_tables
    from ngkit.engine.build import build_dataset
    from ngkit.engine.load import locate
    from ngkit.export import CONFIG
    from ngkit.recipe import load_recipe

    if data is None:
        if (target / CONFIG).is_file():
            raise NgkitError(f"{target} is an export, which names no dataset to encode; pass --data RECIPE_OR_DATASET")
        data = str(locate(target)[0] / "recipe.toml")
    if data.endswith(".toml"):
        recipe = load_recipe(data)
        _, table, _ = component_tables(recipe)[0]  # [data] without the core's keys
        return build_dataset(recipe), table
    table = {"name": data}
    return build_component("datasets", table, {}, "--data"), table


def encode_dataset(
    tokenizer: Any,
    items: Iterable[tuple[Tensor, int | None]],
    out: Path,
    *,
    labelled: bool,
    shard_size: int,
    batch_size: int,
    fmt: str,
    rank: int,
    world_size: int,
    sample: bool,
    advance: Callable[[int], object],
) -> int:
    """Write this rank's missing shards; returns how many shards it wrote."""
    import torch

    written = 0
    dtype = code_dtype(tokenizer.latent.codes)
    for index, chunk in enumerate(_chunks(items, shard_size)):
        if index % world_size != rank or shard_files(out, index, fmt)["codes"].exists():
            advance(sum(1 for _ in chunk))  # read past it (another rank's, or written before)
            continue
        codes, labels = [], []
        if sample:  # sampled codes depend on the shard only, not on the rank that draws them
            torch.manual_seed(index)
        for batch in _batched(chunk, batch_size):
            codes.append(tokenizer.encode(torch.stack([x for x, _ in batch]), sample=sample).to("cpu", dtype))
            labels += [y for _, y in batch]
            advance(len(batch))
        label_tensor = torch.tensor(labels, dtype=torch.int64) if labelled else None
        write_shard(out, index, fmt, torch.cat(codes), label_tensor)
        written += 1
    return written


def encode_command(
    target: Path = typer.Argument(..., help="Export folder, run directory or checkpoint."),
    out: Path = typer.Option(..., "--out", help="Folder for the shards (created; a rerun resumes)."),
    data: Optional[str] = typer.Option(
        None, "--data", help="Recipe file or registered dataset name (default: the run's)."
    ),
    split: str = typer.Option("train", "--split", help="train or test."),
    num_images: Optional[int] = typer.Option(None, "--num-images", help="Only the first N images of the split."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    shard_size: int = typer.Option(10_000, "--shard-size", min=1, help="Images per shard file."),
    fmt: str = typer.Option("safetensors", "--format", help="safetensors (codes+labels in one file) or npy."),
    sample: bool = typer.Option(False, "--sample", help="Draw codes from q(z|x) instead of the most likely ones."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Encode a dataset split into sharded code files (with labels when the dataset has them)."""
    from ngkit.engine.distributed import pick_device
    from ngkit.tokenizer import load

    if split not in ("train", "test"):
        raise NgkitError(f"--split must be train or test, not {split!r}")
    if fmt not in FORMATS:
        raise NgkitError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    tokenizer = load(target, device=pick_device(device))
    dataset, table = resolve_dataset(target, data)
    if tuple(dataset.spec.shape) != tokenizer.image.shape:
        raise NgkitError(
            f"dataset {table['name']!r} has images {list(dataset.spec.shape)} but the tokenizer takes "
            f"{list(tokenizer.image.shape)}; pick a dataset (or its options) with images of that size"
        )
    config_text = json.dumps(tokenizer.config, sort_keys=True)
    meta = {
        "tokenizer": {"method": tokenizer.config["method"], "step": tokenizer.config["step"],
                      "config_sha256": hashlib.sha256(config_text.encode()).hexdigest()},
        "dataset": table, "split": split, "num_images": num_images, "sample": sample,
        "format": fmt, "shard_size": shard_size, "code_dtype": str(code_dtype(tokenizer.latent.codes)).split(".")[1],
        "latent": tokenizer.config["latent"],
    }
    items, labelled = dataset_items(dataset, split, num_images, seed=0)
    meta["labels"] = labelled
    out.mkdir(parents=True, exist_ok=True)
    if (out / META).exists():
        before = json.loads((out / META).read_text())
        if {k: v for k, v in before.items() if k != "source"} != meta:
            raise NgkitError(
                f"{out} holds codes of another tokenizer, dataset or setting ({out / META}); "
                f"choose another --out, or delete it to start over"
            )
    else:
        from ngkit.engine.checkpoint import write_text_atomic

        write_text_atomic(out / META, json.dumps({**meta, "source": str(target)}, indent=2) + "\n")
    columns = (SpinnerColumn(), TextColumn("encoding"), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=quiet or rank != 0) as progress:
        task = progress.add_task("encode", total=num_images)
        written = encode_dataset(
            tokenizer, items, out, labelled=labelled, shard_size=shard_size, batch_size=batch_size, fmt=fmt,
            rank=rank, world_size=world_size, sample=sample, advance=lambda n: progress.advance(task, n),
        )
    if not quiet:
        console.print(f"rank {rank}: wrote {written} shard(s) to {escape(str(out))}")
