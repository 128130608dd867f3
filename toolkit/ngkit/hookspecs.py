"""Hook specifications: every way a plugin extends ngkit.

Registration hooks (``register_<kind>s``) hand the plugin a ``register(name, factory)`` callback.
They run lazily, the first time a name is looked up, and again after any plugin is added or
removed, so they should do nothing but call ``register``. The *name* is what recipes write; the
*factory* (usually a class) is called with the recipe's options for that component plus the
context arguments it declares by name; which kind gets which is
:data:`ngkit.binding.CONTEXT_BY_KIND` (a factory asking for one its kind does not get is a recipe
error).

Run hooks (``on_*``) are called by the training loop on rank 0 only. pluggy calls the
implementations last-registered first: third-party plugins (loaded after the built-ins, each group
in entry-point name order) before built-ins. Mark an implementation ``@hookimpl(tryfirst=True)``
or ``@hookimpl(trylast=True)`` to move it to the front or the back.

``register_commands`` is called once per ``ngkit`` invocation, before the command line is parsed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    import typer

    from ngkit.components import Register
    from ngkit.engine.run_info import RunInfo

hookspec = pluggy.HookspecMarker("ngkit")

__all__ = [
    "register_beta_schedules",
    "register_datasets",
    "register_decoders",
    "register_encoders",
    "register_methods",
    "register_metrics",
    "register_posterior_proxies",
    "register_priors",
    "register_losses",
    "register_quantizers",
    "register_step_size_policies",
    "on_train_start",
    "on_step_end",
    "on_eval_end",
    "on_checkpoint",
    "on_train_end",
    "register_commands",
]


@hookspec
def register_encoders(register: Register) -> None:
    """Register encoders q(z|x) (:class:`ngkit.components.Encoder`) for ``[model.encoder]``.

    :param register: call ``register(name, factory)``; the factory may take ``image``, ``latent``
        and ``total_steps``.
    """


@hookspec
def register_decoders(register: Register) -> None:
    """Register decoders p(x|z) (:class:`ngkit.components.Decoder`) for ``[model.decoder]``.

    :param register: call ``register(name, factory)``; the factory may take ``image``, ``latent``
        and ``total_steps``.
    """


@hookspec
def register_posterior_proxies(register: Register) -> None:
    """Register posterior proxies (:class:`ngkit.components.PosteriorProxy`) for ``[method.proxy]``.

    :param register: call ``register(name, factory)``; the factory may take ``image``, ``latent``
        and ``total_steps``.
    """


@hookspec
def register_step_size_policies(register: Register) -> None:
    """Register step-size policies for η (:class:`ngkit.components.StepSizePolicy`) for
    ``[method.step_size]``.

    :param register: call ``register(name, factory)``; the factory may take ``image``, ``latent``
        and ``total_steps``.
    """


@hookspec
def register_beta_schedules(register: Register) -> None:
    """Register β schedules (:class:`ngkit.components.BetaSchedule`) for ``[schedule.beta]``.

    :param register: call ``register(name, factory)``; the factory may take ``image``, ``latent``
        and ``total_steps``.
    """


@hookspec
def register_quantizers(register: Register) -> None:
    """Register quantizers (continuous features -> codes, e.g. VQ, FSQ) for ``[method.quantizer]``.

    :param register: call ``register(name, factory)``; the factory may take ``image``, ``latent``
        and ``total_steps``.
    """


@hookspec
def register_methods(register: Register) -> None:
    """Register training methods (:class:`ngkit.components.Method`) for ``[method]``: DAPS and
    every baseline are methods.

    :param register: call ``register(name, factory)``; the factory receives ``encoder``,
        ``decoder``, ``beta``, ``image``, ``latent`` and ``total_steps`` if it declares them.
    """


@hookspec
def register_datasets(register: Register) -> None:
    """Register image datasets (:class:`ngkit.components.ImageDataset`) for ``[data]``.

    :param register: call ``register(name, factory)``; the factory gets no context arguments
        (the dataset is what the others are derived from).
    """


@hookspec
def register_metrics(register: Register) -> None:
    """Register held-out metrics (:class:`ngkit.components.Metric`) for ``[eval] metrics`` and
    ``ngkit eval --metric``.

    :param register: call ``register(name, factory)``; the factory gets no context arguments:
        each :class:`ngkit.components.EvalBatch` carries the images and the ``latent`` spec.
    """


@hookspec
def register_priors(register: Register) -> None:
    """Register generative priors over a frozen tokenizer's codes (:class:`ngkit.priors.Prior`)
    for a prior recipe's ``[prior]`` table (``ngkit prior train``).

    :param register: call ``register(name, factory)``; the factory receives ``latent`` (the
        tokenizer's) and ``classes`` (labels in the code dataset; 0 when unlabelled).
    """


@hookspec
def register_losses(register: Register) -> None:
    """Register reconstruction losses (:class:`ngkit.losses.ReconstructionLoss`) for ``[[loss]]``
    tables: a loss scores decoded images against the originals, per image, and every method's
    decoder log-likelihood is lowered by ``weight`` times it in training (docs/training-like-vqgan.md).

    :param register: call ``register(name, factory)``; the factory may take ``image``, ``latent``
        and ``total_steps``.
    """


@hookspec
def on_train_start(run: RunInfo) -> None:
    """Called once before the first training step (after a resume, before the first new step).

    :param run: the run's directory, resolved recipe, models and latent spec.
    """


@hookspec
def on_step_end(run: RunInfo, step: int, logs: dict[str, float]) -> None:
    """Called after every logged training step with the numbers written to ``metrics.jsonl``.

    :param run: the run.
    :param step: the 1-based step just finished.
    :param logs: loss terms, η, β, ESS, learning rate, images/s (whatever the method reports).
    """


@hookspec
def on_eval_end(run: RunInfo, step: int, metrics: dict[str, float]) -> None:
    """Called after each held-out evaluation during training.

    :param run: the run.
    :param step: the step evaluated at.
    :param metrics: metric name -> value.
    """


@hookspec
def on_checkpoint(run: RunInfo, step: int, path: Path) -> None:
    """Called after a checkpoint has been written completely (renamed into place).

    :param run: the run.
    :param step: the step saved.
    :param path: the checkpoint directory.
    """


@hookspec
def on_train_end(run: RunInfo, summary: dict[str, Any]) -> None:
    """Called once when training finishes, with what was written to ``summary.json``.

    :param run: the run.
    :param summary: final held-out metrics and run facts.
    """


@hookspec
def register_commands(cli: typer.Typer) -> None:
    """Add sub-commands to ``ngkit``: ``@cli.command()`` or ``cli.add_typer(...)``. Called once
    per ``ngkit`` invocation, before the command line is parsed, for third-party plugins only;
    keep heavy imports inside the command functions so ``ngkit --help`` stays fast. A command
    name ngkit already has, or a hook that raises, is left out with a warning.

    :param cli: the ``ngkit`` Typer application.
    """
