"""Turn a validated recipe into objects: dataset, encoder, decoder, β schedule, method, metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ngkit.binding import build_component, component_tables
from ngkit.components import BetaSchedule, ImageDataset, ImageSpec, LatentSpec, Method, Metric
from ngkit.errors import RecipeError
from ngkit.recipe import Recipe


@dataclass
class Built:
    dataset: ImageDataset
    image: ImageSpec
    latent: LatentSpec
    beta: BetaSchedule
    method: Method


def latent_for(image: ImageSpec, codes: int, patch_size: int, source: str = "recipe") -> LatentSpec:
    if image.height % patch_size or image.width % patch_size:
        raise RecipeError(
            source,
            [
                f"[model.patch_size] {patch_size} does not divide the {image.height}x{image.width} "
                f"images of this dataset; pick a divisor of both"
            ],
        )
    return LatentSpec((image.height // patch_size, image.width // patch_size), codes)


def build_dataset(recipe: Recipe) -> ImageDataset:
    kind, table, where = component_tables(recipe)[0]
    return build_component(kind, table, {}, where)


def build(recipe: Recipe, dataset: ImageDataset | None = None) -> Built:
    """Build every component of a recipe (the dataset may be passed in to reuse its load)."""
    dataset = dataset or build_dataset(recipe)
    image = dataset.spec
    latent = latent_for(image, recipe.model.codes, recipe.model.patch_size)
    context: dict[str, Any] = {"image": image, "latent": latent, "total_steps": recipe.run.steps}
    tables = {where: (kind, table) for kind, table, where in component_tables(recipe)}
    for where in ("model.encoder", "model.decoder", "schedule.beta"):
        kind, table = tables[where]
        context[where.split(".")[1]] = build_component(kind, table, context, where)
    kind, table = tables["method"]
    method = build_component(kind, table, context, "method")
    return Built(dataset, image, latent, context["beta"], method)


def build_metrics(names: list[str], options: dict[str, dict[str, Any]]) -> dict[str, Metric]:
    """Fresh metrics from ``[eval.options.<name>]``. Metrics get no context arguments
    (:data:`ngkit.binding.CONTEXT_BY_KIND`; one asking for any is refused when the recipe is
    validated): each :class:`~ngkit.components.EvalBatch` carries the images and the latent spec,
    so the same metric serves ``ngkit run`` and ``ngkit eval``."""
    return {
        name: build_component("metrics", {"name": name, **options.get(name, {})}, {}, f"eval.metrics.{name}")
        for name in names
    }
