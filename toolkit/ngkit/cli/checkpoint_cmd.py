"""``ngkit checkpoint convert RUN --trust``: make an older run's checkpoints load weights-only.

    ngkit checkpoint convert runs/quickstart --trust
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from ngkit.errors import NgkitError

app = typer.Typer(help="Checkpoint maintenance.", no_args_is_help=True)


@app.command("convert")
def convert(
    run: Path = typer.Argument(..., help="Run directory written by an older ngkit."),
    trust: bool = typer.Option(False, "--trust", help="I made this run: unpickling its files may run their code."),
) -> None:
    """Rewrite a run's rank files and markers so that ngkit loads them without unpickling code."""
    from ngkit.engine.checkpoint import convert_trusted, refuse_symlinks

    if not (run / "recipe.toml").is_file():
        raise NgkitError(f"{run} is not an ngkit run directory (no recipe.toml)")
    if not trust:
        raise NgkitError(
            f"converting {run} unpickles its old rank files, which runs any code they hold; pass --trust "
            f"only for a run you made yourself (never for one you downloaded)"
        )
    refuse_symlinks(run)
    for line in convert_trusted(run / "checkpoints"):
        Console().print(escape(line))
