"""Reconstruction losses from ``[[loss]]`` tables, for every method (``register_losses``).

    [[loss]]
    name = "lpips"
    weight = 100.0   # nats of log-likelihood per unit of LPIPS, per image
    start = 200      # first step it applies at

Every method trains its decoder, and scores its encoder's codes, through
``decoder.log_prob(x, params)`` (the reward of DAPS and the policy-gradient methods, the negative
loss of VQ-VAE/FSQ/Gumbel). In training, from ``start`` on, that log-likelihood becomes

    log p(x|z) - sum_i weight_i * loss_i(x, mean(params)),

so a perceptual term steers the decoder by its gradient and, for DAPS, also which codes the
encoder picks (through the reward, which need not be differentiable). It is the log of an
unnormalised likelihood p(x|z) exp(-sum_i w_i L_i), so the objective trained is no longer a
bound on log p(x); evaluation (``ngkit eval``, the run's ``beta-elbo``) scores the decoder's own
likelihood, because the terms are added in training mode only. Each loss's batch mean is logged
as ``loss/<name>``.

The losses live outside the method's state dict (frozen networks such as LPIPS's VGG are
neither trained, checkpointed nor exported). A loss with a training state of its own (the
adversarial loss's discriminator and its optimiser) may define, beside ``__call__``:

- ``attach(method)``: called once with the method before training (e.g. to find the decoder's
  last layer);
- ``begin_step(step)``: before each micro-batch's forward in training (the same ``step`` for the
  micro-batches of one optimiser step);
- ``weight_factor(nll, value) -> Tensor``: a detached factor on ``weight`` for this batch, given the
  mean negative log-likelihood so far and the loss's batch mean (VQGAN's adaptive weight);
- ``after_step(step) -> dict[str, float]``: after each applied optimiser step (its own update),
  returning numbers to log;
- ``training_state()`` / ``load_training_state(state)``: tensors and numbers kept in the
  checkpoint's client state under ``losses`` (read back with ``weights_only=True``) and restored
  on resume (not ``state_dict``: a frozen network's weights do not belong in every checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ngkit.components import StepOutput


class ReconstructionLoss(Protocol):
    def __call__(self, images: Tensor, reconstructions: Tensor) -> Tensor:
        """Per-image loss ``[N]`` of reconstructions ``[N, C, H, W]`` (pixels in [0, 1], with
        gradient) against the images; 0 for identical images."""
        ...


@dataclass
class WeightedLoss:
    name: str
    weight: float
    start: int
    fn: ReconstructionLoss


@dataclass
class _State:
    step: int = 0
    values: dict[str, Tensor] = field(default_factory=dict)


def attach_losses(method: nn.Module, losses: list[WeightedLoss], device: torch.device) -> None:
    """Make ``method``'s decoder log-likelihood include ``losses`` in training and its forward
    log them; wraps the two calls on the instances, so state-dict names stay as they are."""
    if not losses:
        return
    decoder = method.decoder
    for loss in losses:  # a frozen network freezes itself (LPIPS); a discriminator trains
        if isinstance(loss.fn, nn.Module):
            loss.fn.to(device)
    state = _State()
    log_prob, forward, after_step = decoder.log_prob, method.forward, method.after_step
    for loss in losses:
        if hasattr(loss.fn, "attach"):
            loss.fn.attach(method)

    def log_prob_with_losses(x: Tensor, params: Tensor) -> Tensor:
        logp = log_prob(x, params)
        active = [loss for loss in losses if decoder.training and state.step >= loss.start]
        if not active:
            return logp
        recon = decoder.mean(params)
        for loss in active:
            value = loss.fn(x.float(), recon.float())
            state.values[loss.name] = value.detach().mean()
            weight = loss.weight
            if hasattr(loss.fn, "weight_factor"):
                factor = loss.fn.weight_factor(-logp.mean(), value.mean())
                state.values[f"{loss.name}_scale"] = factor
                weight = weight * factor
            logp = logp - weight * value.to(logp.dtype)
        return logp

    def forward_with_logs(x: Tensor, step: int) -> StepOutput:
        state.step, state.values = step, {}
        for loss in losses:
            if hasattr(loss.fn, "begin_step"):
                loss.fn.begin_step(step)
        out = forward(x, step)
        return StepOutput(out.loss, {**out.logs, **{f"loss/{k}": v for k, v in state.values.items()}})

    def after_step_with_losses(step: int) -> dict[str, float]:
        logs = dict(after_step(step))
        for loss in losses:
            if hasattr(loss.fn, "after_step"):
                logs.update({f"{loss.name}/{k}": v for k, v in loss.fn.after_step(step).items()})
        return logs

    decoder.log_prob = log_prob_with_losses
    method.forward = forward_with_logs
    method.after_step = after_step_with_losses


STATE_KEY = "losses"  # key of the losses' own state in the checkpoint's client state


def losses_state(losses: list[WeightedLoss]) -> dict[str, Any]:
    """The state of every loss that keeps one, by its position in ``[[loss]]``."""
    return {str(i): loss.fn.training_state() for i, loss in enumerate(losses) if hasattr(loss.fn, "training_state")}


def load_losses_state(losses: list[WeightedLoss], state: dict[str, Any]) -> None:
    """Restore :func:`losses_state` (on resume)."""
    for i, loss in enumerate(losses):
        if str(i) in state and hasattr(loss.fn, "load_training_state"):
            loss.fn.load_training_state(state[str(i)])


def build_losses(tables: list[dict[str, Any]], context: dict[str, Any]) -> list[WeightedLoss]:
    """The ``[[loss]]`` tables of a resolved recipe, built by their registered factories."""
    from ngkit.binding import build_component

    built = []
    for i, table in enumerate(tables):
        options = {k: v for k, v in table.items() if k not in ("weight", "start")}
        fn = build_component("losses", options, context, f"loss.{i}")
        built.append(WeightedLoss(table["name"], float(table.get("weight", 1.0)), int(table.get("start", 0)), fn))
    return built
