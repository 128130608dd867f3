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


MODEL_TABLES = {"model.encoder": "encoders", "model.decoder": "decoders", "schedule.beta": "beta_schedules"}


def model_tables(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """The component tables that make the model, by recipe key: encoder, decoder, β, method."""
    return {where: table for _, table, where in component_tables(recipe) if where in MODEL_TABLES or where == "method"}


def build_method(
    tables: dict[str, dict[str, Any]], image: ImageSpec, latent: LatentSpec, total_steps: int
) -> tuple[BetaSchedule, Method]:
    """Encoder, decoder and β schedule from their tables, then the method around them: needs the
    image spec, not the dataset (so a trained tokenizer loads without its training data)."""
    context: dict[str, Any] = {"image": image, "latent": latent, "total_steps": total_steps}
    for where, kind in MODEL_TABLES.items():
        context[where.split(".")[1]] = build_component(kind, tables[where], context, where)
    method = build_component("methods", tables["method"], context, "method")
    return context["beta"], method


def build(recipe: Recipe, dataset: ImageDataset | None = None) -> Built:
    """Build every component of a recipe (the dataset may be passed in to reuse its load)."""
    dataset = dataset or build_dataset(recipe)
    image = dataset.spec
    latent = latent_for(image, recipe.model.codes, recipe.model.patch_size)
    beta, method = build_method(model_tables(recipe), image, latent, recipe.run.steps)
    return Built(dataset, image, latent, beta, method)


def build_metrics(names: list[str], options: dict[str, dict[str, Any]]) -> dict[str, Metric]:
    """Fresh metrics from ``[eval.options.<name>]``. Metrics get no context arguments
    (:data:`ngkit.binding.CONTEXT_BY_KIND`; one asking for any is refused when the recipe is
    validated): each :class:`~ngkit.components.EvalBatch` carries the images and the latent spec,
    so the same metric serves ``ngkit run`` and ``ngkit eval``."""
    return {
        name: build_component("metrics", {"name": name, **options.get(name, {})}, {}, f"eval.metrics.{name}")
        for name in names
    }
