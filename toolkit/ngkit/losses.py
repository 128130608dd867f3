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
neither trained, checkpointed nor exported).
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
    for loss in losses:
        if isinstance(loss.fn, nn.Module):
            loss.fn.to(device).eval().requires_grad_(False)
    state = _State()
    log_prob, forward = decoder.log_prob, method.forward

    def log_prob_with_losses(x: Tensor, params: Tensor) -> Tensor:
        logp = log_prob(x, params)
        active = [loss for loss in losses if decoder.training and state.step >= loss.start]
        if not active:
            return logp
        recon = decoder.mean(params)
        for loss in active:
            value = loss.fn(x.float(), recon.float())
            state.values[loss.name] = value.detach().mean()
            logp = logp - loss.weight * value.to(logp.dtype)
        return logp

    def forward_with_logs(x: Tensor, step: int) -> StepOutput:
        state.step, state.values = step, {}
        out = forward(x, step)
        return StepOutput(out.loss, {**out.logs, **{f"loss/{k}": v for k, v in state.values.items()}})

    decoder.log_prob = log_prob_with_losses
    method.forward = forward_with_logs


def build_losses(tables: list[dict[str, Any]], context: dict[str, Any]) -> list[WeightedLoss]:
    """The ``[[loss]]`` tables of a resolved recipe, built by their registered factories."""
    from ngkit.binding import build_component

    built = []
    for i, table in enumerate(tables):
        options = {k: v for k, v in table.items() if k not in ("weight", "start")}
        fn = build_component("losses", options, context, f"loss.{i}")
        built.append(WeightedLoss(table["name"], float(table.get("weight", 1.0)), int(table.get("start", 0)), fn))
    return built
