"""``ngkit compare``: train several methods from one recipe and tabulate them side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from ngkit.errors import NgkitError
from ngkit.recipe import apply_overrides, parse_recipe, read_toml


def compare(
    recipe: Path = typer.Argument(..., help="Recipe with [compare.variants] (e.g. recipes/compare-photos.toml)."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma list of variants or method names (default: all variants)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Equal step budget for every method."),
    seconds: Optional[float] = typer.Option(
        None, "--seconds", help="Equal wall clock: every method trains this many seconds (to its first step past them)."
    ),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma list of seeds, or a count N for seeds 0..N-1."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: runs/compare-<recipe>)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key for every method: dotted.key=value."),
) -> None:
    """Same data, decoder, bits per image, budget and held-out images for every method."""
    if steps is not None and seconds is not None:
        raise NgkitError("give --steps or --seconds, not both")
    if seconds is not None and not seconds > 0:
        raise NgkitError(f"--seconds {seconds}: give a positive number of seconds of training per run")
    seed_list = None
    if seeds:
        parts = [s.strip() for s in seeds.split(",") if s.strip()]
        if not all(p.lstrip("-").isdigit() for p in parts):
            raise NgkitError(f"--seeds {seeds!r}: expected a count (3) or a comma list of integers (0,1,2)")
        seed_list = list(range(int(parts[0]))) if len(parts) == 1 else [int(p) for p in parts]
    raw = apply_overrides(read_toml(recipe), set_, str(recipe))
    parsed = parse_recipe(raw, str(recipe))
    labels = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    out = out or Path(f"runs/compare-{recipe.stem}")

    from ngkit.compare import run_compare

    run_compare(recipe, raw, parsed, out, labels=labels, steps=steps, seconds=seconds, seeds=seed_list)
    Console(stderr=True).print(f"[bold green]comparison in[/] {escape(str(out.resolve()))} (results.md, results.csv, results.json, curves.png, reconstructions.png)")
