"""``ngkit sample``: draw images from a trained prior run.

    ngkit sample runs/digits-flow --num 8                   # 8 per class, every class
    ngkit sample runs/digits-flow --num 16 --label 3 --guidance 2 --seed 1 --score
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from ngkit.errors import NgkitError

console = Console(stderr=True)


def sample_command(
    run_dir: Path = typer.Argument(..., help="Run directory of 'ngkit prior train' (or one of its checkpoints)."),
    num: int = typer.Option(8, "--num", min=1, help="Samples per label (per class when no --label)."),
    label: Optional[int] = typer.Option(None, "--label", help="Only this class (default: every class)."),
    guidance: float = typer.Option(1.0, "--guidance", help="Classifier-free guidance scale; 1: the conditional model."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampler (same seed, same samples)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Files stem (default: RUN/samples/label-L-g-G-seed-S)."),
    score: bool = typer.Option(False, "--score", help="Also score class consistency (trains a pixel classifier)."),
) -> None:
    """Write an image grid PNG (one row per class), an .npz (codes, labels, images) and a .json."""
    import torch

    from ngkit.priors.run import load_prior_run
    from ngkit.priors.samples import with_suffix, write_samples
    from ngkit.priors.scores import class_balanced_labels

    run = load_prior_run(run_dir)
    classes = run.recipe.prior.classes or 0
    if label is not None and not 0 <= label < classes:
        raise NgkitError(
            f"--label {label}: this prior knows classes 0..{classes - 1}" if classes
            else f"--label {label}: this prior was trained without labels; leave --label out"
        )
    labels = class_balanced_labels(classes, num) if label is None else torch.full((num,), label)
    which = "all" if label is None else str(label)
    stem = out or run.run_dir / "samples" / f"label-{which}-g{guidance:g}-seed{seed}"
    record = write_samples(run, labels, stem, guidance=guidance, seed=seed, score=score)
    console.print(f"{record['samples']} samples, distinct fraction {record['distinct_fraction']:.3f}"
                  + (f", class consistency {record['class_consistency']:.3f}" if "class_consistency" in record else ""))
    for suffix in (".png", ".npz", ".json"):
        console.print(f"  {escape(str(with_suffix(stem, suffix)))}")
