"""``ngkit prior train``: train a generative prior over a frozen tokenizer's codes.

    ngkit prior train recipes/priors/digits-flow.toml --set prior.tokenizer=runs/digits-fsq
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from ngkit.cli.run_cmd import next_free
from ngkit.errors import NgkitError

console = Console(stderr=True)
app = typer.Typer(help="Generative priors over a tokenizer's codes.", no_args_is_help=True, rich_markup_mode=None)


@app.command("train")
def train_command(
    recipe: Optional[Path] = typer.Argument(None, help="Prior recipe TOML (with a [prior] table)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: [run] out_dir)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: dotted.key=value (repeatable)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the prior run in this directory."),
    per_class: int = typer.Option(
        20, "--samples-per-class", min=0, help="Samples per class scored at the end (generation.json); 0: none."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train a prior with the same engine as a tokenizer, then sample and score it."""
    from ngkit.priors.recipe import load_prior_recipe
    from ngkit.priors.train import train_prior

    if resume is not None:
        if not (resume / "recipe.toml").exists():
            raise NgkitError(f"--resume {resume}: no recipe.toml there, so it is not an ngkit run directory")
        source, out = resume / "recipe.toml", resume
    elif recipe is None:
        raise NgkitError("pass a prior recipe (e.g. recipes/priors/digits-flow.toml) or --resume RUN_DIR")
    else:
        source = recipe
    parsed = load_prior_recipe(source, set_)
    if out is None:
        out = next_free(Path(parsed.run.out_dir.format(recipe=source.stem)))
    result = train_prior(parsed, out, resume=resume is not None, quiet=quiet, source=str(source))
    if not result.main:
        return
    if per_class:
        from ngkit.priors.run import load_prior_run
        from ngkit.priors.samples import write_samples
        from ngkit.priors.scores import class_balanced_labels

        run = load_prior_run(out)
        labels = class_balanced_labels(run.recipe.prior.classes or 0, per_class)
        record = write_samples(run, labels, out / "generation", guidance=1.0, seed=0, score=True)
        shown = {k: record[k] for k in ("distinct_fraction", "class_consistency", "classifier_test_accuracy") if k in record}
        console.print(f"generation ({record['samples']} samples): {shown}")
    console.print(f"[bold green]results in[/] {escape(str(out.resolve()))}")
    for name in ("summary.json", "metrics.jsonl", "reconstructions.png", "curves.png", "generation.png", "generation.json"):
        if (out / name).exists():
            console.print(f"  {escape(str(out / name))}")
