"""``ngkit eval PRIOR_RUN``: a prior's samples through the engine's evaluation and metrics.

The prior is wrapped as the engine's method (:class:`ngkit.priors.trainer.PriorMethod`), so
:func:`ngkit.engine.evaluate.evaluate` draws one sample per held-out image (labels 0, 1, ... in
turn) and feeds every metric the held-out images as originals and the samples as
reconstructions: ``fid`` with ``mode = "generation"`` is then FID of samples vs held-out images.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ngkit import versions
from ngkit.engine.build import build_metrics
from ngkit.engine.evaluate import evaluate
from ngkit.errors import NgkitError
from ngkit.priors.run import load_prior_run
from ngkit.priors.train import code_dataset
from ngkit.priors.trainer import PriorMethod

RECONSTRUCTION_METRICS = {"mse", "psnr", "ssim", "beta-elbo"}  # they compare an image with its own reconstruction


def eval_prior_run(
    target: Path, metrics: list[str], *, num_images: int | None, batch_size: int | None,
    options: dict[str, dict[str, Any]], seed: int = 0,
) -> dict[str, Any]:
    """Evaluate samples of a prior run; returns the record also written to ``eval-<time>.json``."""
    wrong = sorted(set(metrics) & RECONSTRUCTION_METRICS)
    if wrong:
        raise NgkitError(
            f"{target} is a prior run: its samples have no originals, so {', '.join(wrong)} mean nothing "
            f"here; use fid (with --mode generation), usage or distinct, or 'ngkit sample --score'"
        )
    if "fid" in metrics and options.get("fid", {}).get("mode") != "generation":
        raise NgkitError(f"{target} is a prior run: its FID is a generation FID; pass --mode generation")
    run = load_prior_run(target)
    recipe, codes, tokenizer = code_dataset(run.recipe, str(run.run_dir / "recipe.toml"))
    n = num_images or recipe.eval.num_images
    torch.manual_seed(seed)
    result = evaluate(
        PriorMethod(run.prior, tokenizer), codes, build_metrics(metrics, options), num_images=n,
        batch_size=batch_size or recipe.eval.batch_size, beta=0.0, device=torch.device("cpu"),
    )
    record = {
        "run": str(run.run_dir), "checkpoint": f"step {run.step}", "step": run.step,
        "dataset": recipe.data.name, "split": "test (held-out images) vs samples", "num_images": result.num_images,
        "seed": seed, "prior": recipe.prior.name, "tokenizer": recipe.prior.tokenizer,
        "values": result.values, "by_metric": result.by_metric, "protocol": result.protocols,
        "versions": versions(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out = run.run_dir / f"eval-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    record["written_to"] = str(out)
    return record
