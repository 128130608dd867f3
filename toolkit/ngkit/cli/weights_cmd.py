"""``ngkit weights``: put known weights files (the FID Inception) where ngkit finds them."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="Manage weights files (FID Inception-v3).", no_args_is_help=True, rich_markup_mode=None)
console = Console()


@app.command("add")
def add(path: Path = typer.Argument(..., help="A downloaded weights file."), name: str = typer.Option("inception", help="Which known weights it is.")) -> None:
    """Check a file's SHA-256 and copy it into ngkit's cache."""
    from ngkit.weights import add_weights

    console.print(f"added {escape(str(add_weights(path, name)))}")


@app.command("fetch")
def fetch(name: str = typer.Argument("inception")) -> None:
    """Download known weights into the cache (needs internet access)."""
    from ngkit.weights import fetch_weights

    console.print(f"fetched {escape(str(fetch_weights(name)))}")


@app.command("list")
def list_() -> None:
    """Known weights files and whether ngkit finds them."""
    from ngkit.weights import KNOWN_WEIGHTS, cache_dir

    table = Table(title=f"weights (cache: {cache_dir()})")
    for col in ("name", "file", "sha256", "present"):
        table.add_column(col)
    for name, spec in KNOWN_WEIGHTS.items():
        present = (cache_dir() / spec.filename).exists()
        table.add_row(name, spec.filename, spec.sha256[:16] + "…", "yes" if present else "no")
    console.print(table)
