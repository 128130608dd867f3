"""``ngkit eval``: held-out metrics of a trained run, with the protocol next to every number.

    ngkit eval RUN_DIR --metric fid --metric psnr --metric usage
    ngkit eval RUN_DIR --codes sample      # one z ~ q(z|x) per image instead of the argmax codes
    ngkit eval stats DATASET --out reference.npz
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ngkit import versions
from ngkit.errors import NgkitError

console = Console(stderr=True)
DEFAULT_METRICS = ["psnr", "mse", "ssim", "usage"]


def _metric_options(
    metrics: list[str], reference_stats: Path | None, weights: Path | None, mode: str | None = None
) -> dict[str, dict[str, Any]]:
    options: dict[str, dict[str, Any]] = {}
    if "fid" in metrics:
        fid: dict[str, Any] = {"mode": mode} if mode else {}
        if reference_stats is not None:
            fid.update(mode="reference", reference_stats=str(reference_stats))
        if weights is not None:
            fid["weights"] = str(weights)
        options["fid"] = fid
    return options


def eval_run(
    target: Path,
    metrics: list[str],
    *,
    num_images: int | None,
    data: str | None,
    split: str,
    reference_stats: Path | None,
    inception_weights: Path | None,
    batch_size: int | None,
    mode: str | None = None,
    codes: str = "argmax",
    weights: str | None = None,
) -> dict[str, Any]:
    """Evaluate a run or checkpoint; returns the record also written to ``eval-<time>.json``."""
    from ngkit.engine.build import build_metrics
    from ngkit.engine.deepspeed_engine import DTYPES
    from ngkit.engine.distributed import init_distributed, pick_device, set_accelerator_env
    from ngkit.engine.evaluate import evaluate
    from ngkit.engine.load import load_run

    overrides = [f'data.name="{data}"'] if data else []
    device = pick_device("auto")
    set_accelerator_env(device)
    dist = init_distributed(device)
    loaded = load_run(target, overrides)
    weights = _use_weights(loaded, weights)
    recipe = loaded.recipe
    n = num_images or recipe.eval.num_images
    options = {**recipe.eval.options, **_metric_options(metrics, reference_stats, inception_weights, mode)}
    built_metrics = build_metrics(metrics, options)
    dataset = loaded.built.dataset
    if split == "train":
        dataset = _TrainAsTest(dataset, seed=recipe.run.seed)
    beta = loaded.built.beta(loaded.step)
    result = evaluate(
        loaded.engine.module, dataset, built_metrics, num_images=n,
        batch_size=batch_size or recipe.eval.batch_size, beta=beta, device=dist.device,
        rank=dist.rank, world_size=dist.world_size, codes=codes, seed=recipe.run.seed,  # type: ignore[arg-type]
        dtype=DTYPES[recipe.distributed.precision],  # as the run evaluated, so the figures agree
    )
    record = {
        "run": str(loaded.run_dir),
        "checkpoint": loaded.tag,
        "step": loaded.step,
        "dataset": recipe.data.name,
        "split": split,
        "num_images": n,
        "codes": codes,
        "weights": weights,
        "seed": recipe.run.seed,
        "beta": beta,
        "values": result.values,
        "by_metric": result.by_metric,
        "protocol": result.protocols,
        "versions": versions(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if dist.rank == 0:
        out = loaded.run_dir / f"eval-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps(record, indent=2, default=str) + "\n")
        record["written_to"] = str(out)
    return record


def _use_weights(loaded: Any, weights: str | None) -> str:
    """Put the checkpoint's ``[run] ema`` average into the loaded method when ``weights`` (default:
    where the run kept one) is "ema", as training evaluated it; returns which weights are in."""
    import torch

    from ngkit.engine.ema import STATE_KEY
    from ngkit.engine.load import read_model_state
    from ngkit.export import choose_weights

    module, client = read_model_state(loaded.run_dir, loaded.tag)
    _, chosen = choose_weights(module, client, weights, loaded.run_dir / "checkpoints" / loaded.tag)
    if chosen == "ema":
        method = loaded.engine.module
        params = dict(method.named_parameters())
        with torch.no_grad():
            for name, value in client[STATE_KEY]["shadow"].items():
                params[name].copy_(value)
    return chosen


class _TrainAsTest:
    """The first N images of the training stream (seeded), served as a finite split."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed, self.spec = dataset, seed, dataset.spec

    def test(self, *, shard: int, num_shards: int, limit: int | None):
        import itertools

        from ngkit.data import pixels

        stream = self.dataset.train(seed=self.seed, epoch=0, shard=shard, num_shards=num_shards)
        share = None if limit is None else (limit - shard + num_shards - 1) // num_shards
        return (pixels(example.load()) for example in itertools.islice(stream, share))


def write_reference_stats(
    dataset: str, out: Path, *, num_images: int | None, weights: Path | None, batch_size: int
) -> None:
    """FID reference statistics of a registered dataset's held-out images (default options)."""
    from ngkit.binding import build_component
    from ngkit.data import test_batches

    data = build_component("datasets", {"name": dataset}, {}, "dataset")
    options = {"weights": str(weights)} if weights else {}
    fid = build_component("metrics", {"name": "fid", **options}, {}, "fid")
    if not hasattr(fid, "reference_statistics"):
        raise NgkitError('the registered "fid" metric cannot compute reference statistics')
    source = f"{dataset} held-out images ({num_images or 'all'})"
    stats = fid.reference_statistics(test_batches(data, batch_size, 0, 1, num_images), source)
    stats.save(out)


def print_record(record: dict[str, Any]) -> None:
    table = Table(title=f"{record['run']} @ {record['checkpoint']} ({record['split']}, N={record['num_images']}, {record.get('codes', 'argmax')} codes)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("protocol")
    for name, proto in record["protocol"].items():
        summary = escape("; ".join(f"{k}={v}" for k, v in proto.items() if k != "versions")[:160])
        for key, value in record["by_metric"][name].items() or [(name, "not defined")]:
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            table.add_row(key, shown, summary)
            summary = ""  # the protocol once per metric
    Console().print(table)
    if "written_to" in record:
        console.print(f"written to {escape(record['written_to'])}")


def eval_command(
    target: str = typer.Argument(..., help="Run directory or checkpoint; or 'stats' to compute reference statistics."),
    dataset: Optional[str] = typer.Argument(None, help="With 'stats': the dataset name."),
    metric: list[str] = typer.Option(DEFAULT_METRICS, "--metric", "-m", help="Metric name (repeatable)."),
    data: Optional[str] = typer.Option(None, "--data", help="Evaluate on another registered dataset."),
    split: str = typer.Option("test", "--split", help="test (held-out) or train."),
    num_images: Optional[int] = typer.Option(None, "--num-images", help="Images to evaluate (default: [eval] num_images)."),
    reference_stats: Optional[Path] = typer.Option(None, "--reference-stats", help="FID against an .npz with mu, sigma."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="Path to pt_inception-2015-12-05-6726825d.pth."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    out: Optional[Path] = typer.Option(None, "--out", help="With 'stats': the .npz to write."),
    mode: Optional[str] = typer.Option(None, "--mode", help="FID mode: rfid, reference or generation (a prior run)."),
    as_json: bool = typer.Option(False, "--json", help="Print the record as JSON."),
    codes: str = typer.Option("argmax", "--codes", help="argmax (deterministic encode) or sample (one z ~ q(z|x) per image, seeded)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="ema (the [run] ema average; the default when the run kept one) or raw."),
) -> None:
    """Evaluate a trained run on held-out images (or compute FID reference statistics)."""
    if split not in ("test", "train"):
        raise NgkitError(f"--split must be test or train, not {split!r}")
    if codes not in ("argmax", "sample"):
        raise NgkitError(f"--codes must be argmax or sample, not {codes!r}")
    if target == "stats":
        if dataset is None or out is None:
            raise NgkitError("usage: ngkit eval stats DATASET --out FILE.npz [--num-images N]")
        write_reference_stats(dataset, out, num_images=num_images, weights=inception_weights,
                              batch_size=batch_size or 50)
        console.print(f"reference statistics written to {escape(str(out))}")
        return
    from ngkit.priors.recipe import is_prior_recipe

    if (Path(target) / "recipe.toml").is_file() and is_prior_recipe(Path(target) / "recipe.toml"):
        from ngkit.priors.evaluate import eval_prior_run

        metric = ["usage", "distinct"] if metric == DEFAULT_METRICS else metric  # a prior's samples have no originals
        options = _metric_options(metric, reference_stats, inception_weights, mode)
        record = eval_prior_run(Path(target), metric, num_images=num_images, batch_size=batch_size, options=options)
        if as_json:
            print(json.dumps(record, indent=2, default=str))
        else:
            print_record(record)
        return
    if mode == "generation":
        raise NgkitError(f"--mode generation evaluates the samples of a prior run; {target} is a tokenizer run")
    record = eval_run(
        Path(target), metric, num_images=num_images, data=data, split=split, reference_stats=reference_stats,
        inception_weights=inception_weights, batch_size=batch_size, mode=mode, codes=codes, weights=weights,
    )
    if as_json:
        print(json.dumps(record, indent=2, default=str))
    else:
        print_record(record)
