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
    dataset_options,
    format_errors,
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


def _component_problems(raw: dict[str, Any]) -> list[str]:
    """The dataset, the prior and the metrics checked against their factories (from the raw
    tables, so that they are reported next to any schema problem)."""
    registry = get_registry()
    problems: list[str] = []
    data = raw.get("data")
    if isinstance(data, dict):
        problems += check_component("datasets", dataset_options(data), "data", registry)
    prior = raw.get("prior")
    if isinstance(prior, dict):
        table = {k: v for k, v in prior.items() if k not in PRIOR_KEYS}
        problems += check_component("priors", table, "prior", registry)
    evals = raw.get("eval") if isinstance(raw.get("eval"), dict) else {}
    options = evals.get("options", {}) if isinstance(evals.get("options", {}), dict) else {}
    for metric in evals.get("metrics", EvalSection.model_fields["metrics"].get_default(call_default_factory=True)):
        extra = options.get(metric, {}) if isinstance(options.get(metric, {}), dict) else {}
        problems += check_component("metrics", {"name": metric, **extra}, f"eval.metrics.{metric}", registry)
    return problems


def parse_prior_recipe(raw: dict[str, Any], source: str) -> PriorRecipe:
    """Validate the schema, the dataset, the prior's options and the metrics; one error for all."""
    if "model" in raw or "method" in raw:
        raise RecipeError(source, ["a prior recipe has a [prior] table, not [model]/[method]: train "
                                   "tokenizers with 'ngkit run', priors over their codes with 'ngkit prior train'"])
    try:
        recipe, problems = PriorRecipe.model_validate(raw), []
    except ValidationError as exc:
        recipe, problems = None, format_errors(exc, PriorRecipe)
    problems += _component_problems(raw)
    if problems or recipe is None:
        raise RecipeError(source, problems)
    return recipe


def load_prior_recipe(path: str | Path, overrides: list[str] | None = None) -> PriorRecipe:
    path = Path(path)
    raw = apply_overrides(read_toml(path), overrides or [], str(path))
    return parse_prior_recipe(raw, str(path))


def is_prior_recipe(path: Path) -> bool:
    """Whether a recipe file (or a run's recipe.toml) has a ``[prior]`` table."""
    return "prior" in read_toml(path)
