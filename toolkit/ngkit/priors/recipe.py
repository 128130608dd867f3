"""Prior recipes: a ``[prior]`` table naming the frozen tokenizer and the prior, plus the
engine's own sections (``[data]`` is the labelled image dataset whose codes the prior models).

    [prior]
    name = "discrete-flow"            # a registered prior (see 'ngkit plugins')
    tokenizer = "runs/digits-fsq"     # a run directory or an 'ngkit export' folder
    width = 128                       # any other key is an option of the prior

The schema is :class:`ngkit.recipe.Recipe`'s, less ``[model]``, ``[method]`` and ``[compare]``;
problems are reported all at once, like every recipe's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from ngkit.binding import check_component
from ngkit.errors import RecipeError
from ngkit.plugins import get_registry
from ngkit.recipe import (
    Component,
    DataSection,
    DistributedSection,
    EvalSection,
    OptimSection,
    RunSection,
    ScheduleSection,
    Section,
    apply_overrides,
    read_toml,
)

PRIOR_KEYS = ("tokenizer", "classes", "mask_unused")  # the core's keys of [prior]; the rest are the prior's


class PriorSection(Component):
    """``[prior]``: the registered prior, its options, and the tokenizer whose codes it models."""

    tokenizer: str = Field(description="run directory or export folder of the frozen tokenizer")
    classes: int | None = Field(
        None, ge=0, description="class labels of the code dataset; filled in by 'ngkit prior train'"
    )
    mask_unused: bool = Field(
        True, description="never sample a code the tokenizer did not emit on the training images"
    )

    def table(self) -> dict[str, Any]:
        """The prior's component table: ``name`` and its own options."""
        return {"name": self.name, **self.options}


class PriorRecipe(Section):
    prior: PriorSection
    data: DataSection
    optim: OptimSection = Field(default_factory=lambda: OptimSection(lr=1e-3))
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    run: RunSection
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    eval: EvalSection = Field(default_factory=lambda: EvalSection(metrics=["usage", "distinct"], num_images=200))


def _problems(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            out.append(f"[{key}] unknown key (allowed: {', '.join(PriorRecipe.model_fields)} and their keys)")
        elif err["type"] == "missing":
            out.append(f"[{key}] is required but missing")
        else:
            out.append(f"[{key}] {err['msg']}; found {err.get('input')!r}")
    return out


def parse_prior_recipe(raw: dict[str, Any], source: str) -> PriorRecipe:
    """Validate the schema, the dataset, the prior's options and the metrics; one error for all."""
    if "model" in raw or "method" in raw:
        raise RecipeError(source, ["a prior recipe has a [prior] table, not [model]/[method]: train "
                                   "tokenizers with 'ngkit run', priors over their codes with 'ngkit prior train'"])
    try:
        recipe = PriorRecipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(source, _problems(exc)) from None
    registry = get_registry()
    data = recipe.data.model_dump()
    for core_key in ("batch_size", "workers", "max_unreadable"):
        data.pop(core_key)
    problems = check_component("datasets", data, "data", registry)
    problems += check_component("priors", recipe.prior.table(), "prior", registry)
    for metric in recipe.eval.metrics:
        table = {"name": metric, **recipe.eval.options.get(metric, {})}
        problems += check_component("metrics", table, f"eval.metrics.{metric}", registry)
    if problems:
        raise RecipeError(source, problems)
    return recipe


def load_prior_recipe(path: str | Path, overrides: list[str] | None = None) -> PriorRecipe:
    path = Path(path)
    raw = apply_overrides(read_toml(path), overrides or [], str(path))
    return parse_prior_recipe(raw, str(path))


def is_prior_recipe(path: Path) -> bool:
    """Whether a recipe file (or a run's recipe.toml) has a ``[prior]`` table."""
    return "prior" in read_toml(path)
