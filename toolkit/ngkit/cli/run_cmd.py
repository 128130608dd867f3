"""``ngkit run``: train a recipe (the packaged quickstart when none is given)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from ngkit.errors import NgkitError, RecipeError
from ngkit.recipe import apply_overrides, parse_recipe, read_toml

console = Console(stderr=True)
DEFAULT_RECIPE = "quickstart.toml"


def packaged_recipe(name: str) -> Path:
    """A recipe shipped inside the package (the repo's ``recipes/`` folder)."""
    path = Path(str(importlib.resources.files("ngkit.recipes") / name))
    if not path.exists():
        raise NgkitError(f"no packaged recipe {name!r}; see 'ngkit recipes list'")
    return path


def next_free(path: Path) -> Path:
    """``runs/x``, or ``runs/x-2``, ``runs/x-3``... if it already holds a run."""
    if not (path / "metrics.jsonl").exists():
        return path
    i = 2
    while (path.with_name(f"{path.name}-{i}") / "metrics.jsonl").exists():
        i += 1
    return path.with_name(f"{path.name}-{i}")


def run(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe TOML file; default: the packaged quickstart."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: [run] out_dir)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: dotted.key=value (repeatable)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    tracker: list[str] = typer.Option(
        [], "--tracker", help="Log to an experiment tracker too: tensorboard or wandb (repeatable; sets [run] trackers)."
    ),
) -> None:
    """Train a tokenizer from a recipe and write checkpoints, metrics and pictures."""
    if resume is not None and (recipe is not None or (out is not None and out.resolve() != resume.resolve())):
        given = f"the recipe {recipe}" if recipe is not None else f"--out {out}"
        raise NgkitError(
            f"--resume {resume} continues that run with its own recipe.toml in place, so {given} cannot be "
            f"given with it; change keys with --set (e.g. --set run.steps=N), or start a new run without --resume"
        )
    if resume is not None:
        saved = resume / "recipe.toml"
        if not saved.exists():
            raise NgkitError(f"--resume {resume}: no recipe.toml there, so it is not an ngkit run directory")
        source, out = saved, resume
    else:
        source = recipe or packaged_recipe(DEFAULT_RECIPE)
    if tracker:
        set_ = [*set_, "run.trackers=[" + ", ".join(f'"{name}"' for name in tracker) + "]"]
    raw = apply_overrides(read_toml(source), set_, str(source))
    parsed = parse_recipe(raw, str(source))
    import torch

    from ngkit.engine.build import check_device

    problems = check_device(parsed, torch.cuda.is_available())
    if problems:
        raise RecipeError(str(source), problems)
    if out is None:
        stem = source.stem if resume is None else resume.name
        out = next_free(Path(parsed.run.out_dir.format(recipe=stem)))

    from ngkit.engine.train_loop import train

    result = train(parsed, out, resume=resume is not None, quiet=quiet)
    if result.main:
        console.print(f"[bold green]results in[/] {escape(str(out.resolve()))}")
        for name in ("summary.json", "metrics.jsonl", "reconstructions.png", "curves.png", "checkpoints"):
            console.print(f"  {escape(str(out / name))}")
