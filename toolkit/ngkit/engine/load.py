"""Loading a trained run back: its resolved recipe, components and checkpoint weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ngkit.engine import checkpoint
from ngkit.engine.build import Built, build
from ngkit.engine.deepspeed_engine import make_engine
from ngkit.errors import NgkitError
from ngkit.recipe import Recipe, load_recipe


@dataclass
class LoadedRun:
    run_dir: Path
    recipe: Recipe
    built: Built
    engine: Any
    tag: str
    step: int


def locate(target: Path) -> tuple[Path, str]:
    """A run directory or one of its checkpoint directories -> (run dir, checkpoint tag)."""
    if (target / "recipe.toml").exists():
        tag = checkpoint.latest_tag(target / "checkpoints")
        if tag is None:
            raise NgkitError(f"{target} has no checkpoints yet (no {target / 'checkpoints' / 'latest'})")
        return target, tag
    if target.parent.name == "checkpoints" and (target.parent.parent / "recipe.toml").exists():
        if not target.is_dir():
            raise NgkitError(f"checkpoint {target} does not exist; see {target.parent} for saved steps")
        return target.parent.parent, target.name
    raise NgkitError(
        f"{target} is neither an ngkit run directory (with recipe.toml) nor a checkpoint inside one "
        f"(RUN/checkpoints/step-N)"
    )


def load_run(target: Path, overrides: list[str] | None = None) -> LoadedRun:
    """Rebuild a run's method and load its weights (needs an initialised process group)."""
    run_dir, tag = locate(target)
    recipe = load_recipe(run_dir / "recipe.toml", overrides)
    built = build(recipe)
    engine = make_engine(built.method, recipe)
    path, client = engine.load_checkpoint(
        str(run_dir / "checkpoints"), tag=tag, load_optimizer_states=False, load_lr_scheduler_states=False
    )
    if path is None:
        raise NgkitError(f"could not load {run_dir / 'checkpoints' / tag}: no model states found there")
    return LoadedRun(run_dir, recipe, built, engine, tag, int((client or {}).get("step", 0)))
