"""Turn a validated recipe into objects: dataset, encoder, decoder, β schedule, method, metrics.

``ngkit run`` builds with :func:`build`; ``ngkit recipes validate`` with :func:`dry_build`, the
same constructors on the meta device (no memory, no compute), so every constructor error is a
validation error. Both check the encoder's and decoder's output shapes with one dummy batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ngkit.binding import build_component, component_label, component_tables, factory_params
from ngkit.plugins import get_registry
from ngkit.components import BetaSchedule, ImageDataset, ImageSpec, LatentSpec, Method, Metric
from ngkit.channels import WithChannels
from ngkit.errors import RecipeError
from ngkit.engine.sizes import check_memory
from ngkit.recipe import Recipe

# Images in the shape-check batch: more than one, so a decoder that mixes up the batch axis shows.
CHECK_BATCH = 2


@dataclass
class Built:
    dataset: ImageDataset
    image: ImageSpec
    latent: LatentSpec
    beta: BetaSchedule
    method: Method


def latent_for(
    image: ImageSpec, codes: int, patch_size: int | tuple[int, int] | list[int], source: str = "recipe"
) -> LatentSpec:
    """The latent grid: one token per ``patch_size`` (p, or (height, width)) patch of the image."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    if image.height % ph or image.width % pw:
        shown = ph if ph == pw else f"[{ph}, {pw}] (height, width)"

        def divisors(n: int) -> str:
            return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)

        raise RecipeError(
            source,
            [
                f"[model.patch_size] {shown} does not tile the {image.height}x{image.width} (height x width) "
                f"images of this dataset; a patch height must divide {image.height} ({divisors(image.height)}) "
                f"and a width {image.width} ({divisors(image.width)}); write [height, width] for non-square patches"
            ],
        )
    return LatentSpec((image.height // ph, image.width // pw), codes)


def check_device(recipe: Recipe, cuda: bool) -> list[str]:
    """Problems of ``[run] device`` and ``[distributed]`` on a machine with or without a CUDA GPU.

    fp32 and bf16 run on CPU and CUDA; fp16 needs CUDA (DeepSpeed's CPU accelerator has no fp16),
    and so does nccl."""
    device, dist = recipe.run.device, recipe.distributed
    if device == "cuda" and not cuda:
        return ['[run.device] "cuda", but torch sees no CUDA GPU on this machine; use "auto" (a GPU when '
                'there is one) or "cpu"']
    problems = []
    if device == "cpu" or not cuda:
        on = 'device = "cpu"' if device == "cpu" else 'device = "auto" and no CUDA GPU on this machine'
        if dist.precision == "fp16":
            problems.append(f'[distributed.precision] "fp16" needs a CUDA GPU ({on}); on the CPU use '
                            '"bf16" or "fp32"')
        if dist.backend == "nccl":
            problems.append(f'[distributed.backend] "nccl" needs CUDA ({on}); use "auto" or "gloo"')
    return problems


def build_dataset(recipe: Recipe, source: str = "recipe") -> ImageDataset:
    """The ``[data]`` dataset with ``[data] channels``: a dataset that declares a ``channels``
    parameter makes them itself (the ``hf`` plugin decodes to grey or RGB), any other is
    converted image by image (:class:`ngkit.channels.WithChannels`)."""
    _, table, where = component_tables(recipe)[0]
    return dataset_with_channels(table, recipe.data.channels, where, source)


def dataset_with_channels(table: dict[str, Any], channels: int | None, where: str = "data",
                          source: str = "recipe") -> ImageDataset:
    """The dataset of a ``[data]`` table without the core's keys, made or converted to ``channels``."""
    kind = "datasets"
    try:
        dataset = build_component(kind, table, {"channels": channels}, where)
    except RecipeError as exc:
        raise RecipeError(source, exc.problems) from exc
    if channels is None or dataset.spec.channels == channels:
        return dataset
    if "channels" in factory_params(get_registry().entries[kind][table["name"]].factory)[0]:
        raise RecipeError(source, [f'[data] dataset "{table["name"]}" was asked for {channels} channels but '
                                   f"makes {dataset.spec.channels}; a bug of its plugin"])
    if dataset.spec.channels not in (1, 3):
        raise RecipeError(source, [f'[data.channels] dataset "{table["name"]}" has {dataset.spec.channels} '
                                   f"channels; only 1 (grey) and 3 (RGB) convert; remove [data] channels"])
    return WithChannels(dataset, channels)


MODEL_TABLES = {"model.encoder": "encoders", "model.decoder": "decoders", "schedule.beta": "beta_schedules"}


def model_tables(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """The component tables that make the model, by recipe key: encoder, decoder, β, method."""
    return {where: table for _, table, where in component_tables(recipe) if where in MODEL_TABLES or where == "method"}


def build_method(
    tables: dict[str, dict[str, Any]], image: ImageSpec, latent: LatentSpec, total_steps: int, source: str = "recipe"
) -> tuple[BetaSchedule, Method]:
    """Encoder, decoder and β schedule from their tables, then the method around them: needs the
    image spec, not the dataset (so a trained tokenizer loads without its training data).

    Problems of the encoder, decoder and β schedule are reported together, with those of the
    shape check (one dummy batch); the method is built only from parts that built."""
    context: dict[str, Any] = {"image": image, "latent": latent, "total_steps": total_steps}
    problems: list[str] = []
    for where, kind in MODEL_TABLES.items():
        try:
            context[where.split(".")[1]] = build_component(kind, tables[where], context, where)
        except RecipeError as exc:
            problems += exc.problems
    registry = get_registry()
    for name, check in (("encoder", check_encoder), ("decoder", check_decoder)):
        if name in context:
            who = component_label(registry.entries[MODEL_TABLES[f"model.{name}"]][tables[f"model.{name}"]["name"]])
            problems += check(context[name], image, latent, f"model.{name}", who)
    if problems:
        raise RecipeError(source, problems)
    try:
        method = build_component("methods", tables["method"], context, "method")
    except RecipeError as exc:
        raise RecipeError(source, exc.problems) from exc
    return context["beta"], method


def build(recipe: Recipe, dataset: ImageDataset | None = None, source: str = "recipe") -> Built:
    """Build every component of a recipe (the dataset may be passed in to reuse its load)."""
    dataset = dataset or build_dataset(recipe, source)
    image = dataset.spec
    latent = latent_for(image, recipe.model.codes, recipe.model.patch_size, source)
    beta, method = build_method(model_tables(recipe), image, latent, recipe.run.steps, source)
    cuda = recipe.run.device == "cuda" or (recipe.run.device == "auto" and torch.cuda.is_available())
    check_memory(recipe, image, latent, sum(p.numel() for p in method.parameters()), "cuda" if cuda else "cpu", source)
    return Built(dataset, image, latent, beta, method)


def dry_build(recipe: Recipe, source: str = "recipe") -> None:
    """Everything :func:`build` and evaluation build, with the models on the meta device.

    A failure that mentions the meta device is repeated on the CPU, so a plugin that cannot be
    built on meta (one that reads a tensor's value in its constructor) is judged by what
    ``ngkit run`` would do. Other failures are not: their CPU build could need the memory that
    the meta device spares (a typo of ``codes = 10**9``)."""
    dataset = build_dataset(recipe, source)
    try:
        with torch.device("meta"):
            build(recipe, dataset, source)
    except RecipeError as exc:
        if not any("meta" in problem.lower() for problem in exc.problems):
            raise
        build(recipe, dataset, source)
    try:
        build_metrics(recipe.eval.metrics, recipe.eval.options)
    except RecipeError as exc:
        raise RecipeError(source, exc.problems) from exc


def build_metrics(names: list[str], options: dict[str, dict[str, Any]]) -> dict[str, Metric]:
    """Fresh metrics from ``[eval.options.<name>]``. Metrics get no context arguments
    (:data:`ngkit.binding.CONTEXT_BY_KIND`; one asking for any is refused when the recipe is
    validated): each :class:`~ngkit.components.EvalBatch` carries the images and the latent spec,
    so the same metric serves ``ngkit run`` and ``ngkit eval``."""
    return {
        name: build_component("metrics", {"name": name, **options.get(name, {})}, {}, f"eval.metrics.{name}")
        for name in names
    }


def _dummy(image: ImageSpec, latent: LatentSpec) -> tuple[Tensor, Tensor]:
    """A batch of mid-grey images and all-zero codes, on the default device (meta under
    :func:`dry_build`)."""
    x = torch.full((CHECK_BATCH, *image.shape), 0.5)
    z = torch.zeros(CHECK_BATCH, latent.tokens, dtype=torch.long)
    return x, z


def _shape_problem(where: str, who: str, what: str, want: tuple[int, ...], got: Tensor) -> list[str]:
    if tuple(got.shape) == want:
        return []
    return [f"[{where}] {who}: {what} has shape {list(got.shape)}, expected {list(want)}"]


def _run_check(module: nn.Module, where: str, who: str, check: Callable[[], list[str]]) -> list[str]:
    """``check()`` in eval mode without gradients or touching the random state; an exception
    is a problem at ``where``."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            return check()
    except Exception as exc:
        return [f"[{where}] {who} failed on a dummy batch of {CHECK_BATCH} images: {type(exc).__name__}: {exc}"]
    finally:
        module.train(was_training)


def check_encoder(encoder: nn.Module, image: ImageSpec, latent: LatentSpec, where: str, who: str) -> list[str]:
    """Teacher-forced ``log_prob`` of a dummy batch: logits ``[B, L, V]`` and ``logq [B]``. An
    encoder without ``log_prob`` (features only, for VQ-VAE/FSQ) is not checked. ``where`` and
    ``who`` (the recipe key and the component) locate the problems."""
    b, tokens, codes = CHECK_BATCH, latent.tokens, latent.codes

    def check() -> list[str]:
        x, z = _dummy(image, latent)
        try:
            out = encoder.log_prob(x, z)
        except NotImplementedError:
            return []
        return _shape_problem(where, who, "log_prob(x, z).logits", (b, tokens, codes), out.logits) + _shape_problem(
            where, who, "log_prob(x, z).logq", (b,), out.logq
        )

    return _run_check(encoder, where, who, check)


def check_decoder(decoder: nn.Module, image: ImageSpec, latent: LatentSpec, where: str, who: str) -> list[str]:
    """``embed`` -> ``forward`` -> ``mean`` and ``log_prob`` on a dummy batch: embeddings
    ``[B, L, embed_dim]``, a reconstruction ``[B, C, H, W]`` and one log-likelihood per image."""
    b = CHECK_BATCH

    def check() -> list[str]:
        x, z = _dummy(image, latent)
        h = decoder.embed(z)
        problems = _shape_problem(where, who, "embed(z)", (b, latent.tokens, decoder.embed_dim), h)
        if problems:
            return problems
        params = decoder(h)
        return _shape_problem(where, who, "mean(forward(h))", (b, *image.shape), decoder.mean(params)) + _shape_problem(
            where, who, "log_prob(x, forward(h))", (b,), decoder.log_prob(x, params)
        )

    return _run_check(decoder, where, who, check)
