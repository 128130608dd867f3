"""Writing samples of a prior run: a grid PNG (one row per class), an ``.npz`` with codes, labels
and images, and the generation scores of :mod:`ngkit.priors.scores`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ngkit.priors.run import PriorRun
from ngkit.priors.scores import PixelClassifier, generation_scores


def with_suffix(stem: Path, suffix: str) -> Path:
    """``stem`` + ``suffix`` (``Path.with_suffix`` would cut a stem like ``g1.5`` at its dot)."""
    return stem.parent / (stem.name + suffix)


def save_sample_grid(path: Path, images: Tensor, labels: Tensor, max_columns: int = 16) -> None:
    """One row per distinct label (in label order), up to ``max_columns`` samples each."""
    from PIL import Image

    from ngkit.engine.artifacts import grid_array

    rows = [images[labels == c][:max_columns] for c in sorted(set(labels.tolist()))]
    Image.fromarray(grid_array(rows)).save(path)


def reference_data(run: PriorRun) -> tuple[PixelClassifier | None, tuple[Tensor, Tensor] | None]:
    """A classifier trained on the run's real training images, and its held-out images with
    labels; none for an unlabelled dataset."""
    from ngkit.priors.train import code_dataset

    _, codes, _ = code_dataset(run.recipe, str(run.run_dir / "recipe.toml"))
    if codes.classes == 0:
        return None, None
    classifier = PixelClassifier(codes.train_images, codes.labels)
    return classifier, (torch.stack(codes.test_images), codes.test_labels)


def write_samples(
    run: PriorRun, labels: Tensor, out_stem: Path, *, guidance: float, seed: int, score: bool,
) -> dict[str, Any]:
    """``<out_stem>.png``, ``.npz`` and ``.json`` (scores and how the samples were drawn)."""
    codes, images = run.sample(labels, guidance=guidance, seed=seed)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    save_sample_grid(with_suffix(out_stem, ".png"), images, labels)
    np.savez_compressed(
        with_suffix(out_stem, ".npz"), codes=codes.numpy().astype(np.int32), labels=labels.numpy(),
        images=images.numpy().astype(np.float32),
    )
    classifier, real = reference_data(run) if score else (None, None)
    record = {
        "run": str(run.run_dir), "step": run.step, "prior": run.recipe.prior.name,
        "tokenizer": run.recipe.prior.tokenizer, "guidance": guidance, "seed": seed,
        **generation_scores(classifier, images, codes, labels, real),
    }
    with_suffix(out_stem, ".json").write_text(json.dumps(record, indent=2) + "\n")
    return record
