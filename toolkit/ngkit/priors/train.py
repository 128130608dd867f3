"""Training a prior with the engine: encode the dataset with the frozen tokenizer, then
:func:`ngkit.engine.train_loop.train` with the prior's builder, then score class-balanced samples."""

from __future__ import annotations

from pathlib import Path

from ngkit.engine.build import dataset_with_channels
from ngkit.engine.train_loop import TrainResult, train
from ngkit.errors import RecipeError
from ngkit.priors.codes import CodeDataset, check_precision
from ngkit.priors.recipe import PriorRecipe
from ngkit.priors.trainer import prior_builder
from ngkit.recipe import dataset_options
from ngkit.tokenizer import Tokenizer, load


def code_dataset(recipe: PriorRecipe, source: str = "recipe") -> tuple[PriorRecipe, CodeDataset, Tokenizer]:
    """The codes the prior learns, and the recipe as the run records it: the tokenizer as an
    absolute path, and the number of classes (so that sampling needs neither the data nor the cwd)."""
    tokenizer_path = Path(recipe.prior.tokenizer).resolve()
    tokenizer = load(tokenizer_path)
    images = dataset_with_channels(dataset_options(recipe.data.model_dump()), recipe.data.channels, "data", source)
    codes = CodeDataset(tokenizer, images)
    if recipe.prior.classes is not None and recipe.prior.classes != codes.classes:
        raise RecipeError(source, [
            f"[prior.classes] is {recipe.prior.classes} but the dataset has {codes.classes} classes; remove the key "
            f"(ngkit prior train fills it in)"
        ])
    check_precision(recipe.distributed.precision, codes.latent.codes, codes.classes, source)
    prior = recipe.prior.model_copy(update={"tokenizer": str(tokenizer_path), "classes": codes.classes})
    return recipe.model_copy(update={"prior": prior}), codes, tokenizer


def train_prior(recipe: PriorRecipe, out: Path, *, resume: bool = False, quiet: bool = False, source: str = "recipe") -> TrainResult:
    """Train the prior of ``recipe`` into ``out`` with the same loop as any tokenizer."""
    recipe, codes, tokenizer = code_dataset(recipe, source)
    builder = prior_builder(recipe.prior.table(), tokenizer, codes, recipe.prior.mask_unused)
    return train(recipe, out, resume=resume, quiet=quiet, builder=builder)  # type: ignore[arg-type]
