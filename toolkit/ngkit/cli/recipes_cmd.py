"""``ngkit recipes list`` and ``ngkit recipes validate``."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ngkit.errors import NgkitError, RecipeError
from ngkit.recipe import apply_overrides, parse_recipe, read_toml, variant_raw

app = typer.Typer(help="List and validate recipes.", no_args_is_help=True, rich_markup_mode=None)


def packaged_recipes() -> list[Path]:
    root = Path(str(importlib.resources.files("ngkit.recipes")))
    return sorted(root.rglob("*.toml"))


def header(path: Path) -> str:
    """The first comment line of a recipe: what it trains."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


@app.command("list")
def list_() -> None:
    """The recipes that ship with ngkit, with the first line of their header."""
    table = Table(title="packaged recipes")
    table.add_column("recipe")
    table.add_column("what it trains")
    root = Path(str(importlib.resources.files("ngkit.recipes")))
    for path in packaged_recipes():
        table.add_row(str(path.relative_to(root)), header(path))
    Console().print(table)


def check_recipe(path: Path, overrides: list[str], gpu: bool) -> None:
    """Parse, bind and build a recipe (and each compare variant) as ``ngkit run`` would, on the
    meta device; raise a RecipeError (or another NgkitError) for the first that fails."""
    import torch

    from ngkit.engine.build import check_device, dry_build
    from ngkit.priors.recipe import is_prior_recipe, load_prior_recipe

    if is_prior_recipe(path):  # a prior over a trained tokenizer's codes: its own schema
        load_prior_recipe(path, overrides)
        return
    raw = apply_overrides(read_toml(path), overrides, str(path))
    recipe = parse_recipe(raw, str(path))
    runs = [(str(path), recipe)] + [
        (f"{path} [compare.variants.{label}]", parse_recipe(variant_raw(raw, partial), str(path)))
        for label, partial in recipe.compare.variants.items()
    ]
    for source, parsed in runs:
        problems = check_device(parsed, gpu or torch.cuda.is_available())
        if problems:
            raise RecipeError(source, problems)
        dry_build(parsed, source)


@app.command("validate")
def validate(
    files: list[Path] = typer.Argument(..., help="Recipe files to check."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: dotted.key=value (repeatable)."),
    gpu: bool = typer.Option(False, "--gpu", help="Check as for a machine with a CUDA GPU (e.g. on a login node)."),
) -> None:
    """Check recipes against the schema and the registered plugins, and build every component
    (on the meta device: no memory, no training) as 'ngkit run' would. Every file is checked and
    reported; exit 2 if any is invalid."""
    console, failed = Console(), 0
    for path in files:
        try:
            check_recipe(path, set_, gpu)
        except NgkitError as exc:
            failed += 1
            Console(stderr=True).print(f"[bold red]invalid:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            continue
        console.print(f"[green]ok[/] {escape(str(path))}")
    if failed:
        if len(files) > 1:
            Console(stderr=True).print(f"{failed} of {len(files)} recipes are invalid", highlight=False)
        raise typer.Exit(2)


@app.command("reference")
def reference() -> None:
    """Print the recipe reference (every key and every component option) as Markdown."""
    from ngkit.recipe import reference_markdown

    print(reference_markdown(), end="")
