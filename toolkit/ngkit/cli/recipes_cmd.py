"""``ngkit recipes list`` and ``ngkit recipes validate``."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ngkit.errors import RecipeError
from ngkit.priors.recipe import is_prior_recipe, load_prior_recipe
from ngkit.recipe import load_recipe

app = typer.Typer(help="List and validate recipes.", no_args_is_help=True)


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


@app.command("validate")
def validate(files: list[Path] = typer.Argument(..., help="Recipe files to check.")) -> None:
    """Check recipes against the schema and the registered plugins; stops at the first bad one."""
    console = Console()
    for path in files:
        try:
            if is_prior_recipe(path):
                load_prior_recipe(path)
            else:
                load_recipe(path)
        except RecipeError as exc:
            Console(stderr=True).print(f"[bold red]invalid:[/] {escape(str(exc))}")
            raise typer.Exit(1) from None
        console.print(f"[green]ok[/] {escape(str(path))}")


@app.command("reference")
def reference() -> None:
    """Print the recipe reference (every key and every component option) as Markdown."""
    from ngkit.recipe import reference_markdown

    print(reference_markdown(), end="")
