"""The encoder's real step, measured and bounded (docs/daps.md "The encoder's real step").

The proxy's trust region bounds KL(q~‖q), not how far the encoder moves: the encoder is fitted to
q~ by the engine's optimiser (AdamW, fixed learning rate), whose step does not depend on η. Here
the step is measured as KL(q_old(·|x) ‖ q_new(·|x)) per image across the optimiser step, and
bounded in one of two ways:

- a penalty, MPO-style (Abdolmaleki et al., 2018, M-step): the policy loss gains
  α·KL(q_prev ‖ q_θ) and the multiplier α is learned by dual ascent so the measured KL stays
  near ε (:class:`EncoderTrustRegion`);
- a projection, TRPO-style (Schulman et al., 2015, line search): after the optimiser's step the
  encoder's parameters are moved back along it, θ_old + t·Δθ, with the largest t found that
  keeps the measured KL ≤ ε (:func:`project_step`), so the bound holds at every step.

Public API (:mod:`ngkit.methods`): the DAPS method plugin uses it; so may any method plugin.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ngkit.distributed import mean_over_ranks

# Range of the multiplier α (nats of policy loss per nat of KL); the upper end stops a run whose
# bound cannot be met from overflowing, the lower one lets log α come back within ~20 updates.
ALPHA_MIN = 1e-3
ALPHA_MAX = 1e6
# A step that did not move the encoder at all still lowers log α by a bounded amount.
KL_RATIO_MIN = 1e-3
# Trials of the projection's line search after the full step: the first at the quadratic model's
# t = sqrt(ε/KL(1)), then bisection, each one encoder pass on the batch; 4 trials leave the last
# bracket 1/8 of its first width wide (the quadratic guess is usually within a few % of the root).
LINE_SEARCH_TRIALS = 4


def token_kl(old_logits: Tensor, new_logits: Tensor) -> Tensor:
    """KL(q_old ‖ q_new) per image from normalised per-token log-probabilities ``[K, B, L, V]``.

    Σ_l KL(q_old(·|z_<l) ‖ q_new(·|z_<l)), averaged over the K sequences z ~ q_old the logits were
    teacher-forced on: by the chain rule an unbiased estimate of the sequence KL for an
    autoregressive encoder, and exact for a factorised one (its logits do not depend on z).
    Returns ``[B]`` in nats, computed in float64.
    """
    old, new = old_logits.double(), new_logits.double()
    per_token = (old.exp() * (old - new)).sum(-1)  # [K, B, L]
    return per_token.sum(-1).mean(0)


class EncoderTrustRegion(nn.Module):
    """The multiplier α of the constraint KL(q_old ‖ q_new) ≤ ``bound`` on the encoder's step.

    After each taken step the measured KL (mean over the batch's images, averaged over ranks)
    moves log α by dual ascent, ``log α += lr · (KL/ε − 1)``: up when the step went too far, down
    when it stayed inside. α is a float64 buffer: checkpointed with the method, invisible to the
    model optimiser, identical on every rank, and never cast to bf16/fp16.
    """

    log_alpha: Tensor

    def __init__(self, bound: float, lr: float, init: float) -> None:
        super().__init__()
        if not bound > 0:
            raise ValueError(f"encoder trust region: bound must be > 0 nats per image, got {bound}")
        if not lr > 0:
            raise ValueError(f"encoder trust region: lr (dual step in log α) must be > 0, got {lr}")
        if not ALPHA_MIN <= init <= ALPHA_MAX:
            raise ValueError(f"encoder trust region: init α must be in [{ALPHA_MIN:g}, {ALPHA_MAX:g}], got {init}")
        self.bound = bound
        self.lr = lr
        self.register_buffer("log_alpha", torch.tensor(math.log(init), dtype=torch.float64))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> EncoderTrustRegion:
        """Follow device moves but never dtype casts (α must stay float64)."""
        self.log_alpha = self.log_alpha.to(device=fn(self.log_alpha).device)
        return self

    @property
    def alpha(self) -> float:
        return float(self.log_alpha.exp())

    def penalty(self, kl: Tensor) -> Tensor:
        """α·KL with gradient through ``kl`` only (α is the dual variable, not trained here)."""
        return self.log_alpha.detach().exp().to(kl.device, kl.dtype) * kl

    @torch.no_grad()
    def update(self, measured_kl: Tensor) -> dict[str, float]:
        kl = mean_over_ranks(measured_kl.detach().double().reshape(1))[0].to(self.log_alpha.device)  # same dual step on every rank
        ratio = (kl / self.bound).clamp_min(KL_RATIO_MIN)
        self.log_alpha.add_(self.lr * ratio.log()).clamp_(math.log(ALPHA_MIN), math.log(ALPHA_MAX))
        return {"tr_alpha": self.alpha}


@dataclass(frozen=True)
class StepProjection:
    """What :func:`project_step` did: the fraction ``t`` of the step kept (1 = the full step),
    the KL of the full step (``kl_raw``) and of the step kept (``kl``), nats, mean over ranks."""

    t: float
    kl_raw: float
    kl: float


@torch.no_grad()
def project_step(
    params: Sequence[Tensor], old: Sequence[Tensor], kl_now: Callable[[], Tensor], bound: float,
    trials: int = LINE_SEARCH_TRIALS,
) -> StepProjection:
    """Move ``params`` (already stepped from ``old``) back to θ_old + t·Δθ, t ∈ [0, 1] the largest
    found with ``kl_now()`` ≤ ``bound``; ``kl_now`` measures the current parameters' KL from the
    old ones (a scalar, this rank's mean; averaged over ranks here, so every rank takes the same t).

    The full step is kept untouched when it is inside the bound (t = 1, no arithmetic on the
    parameters). Otherwise the first trial is the quadratic model's t = sqrt(ε/KL(1)) (a KL is
    quadratic in a small step), then bisection between the largest t known inside and the smallest
    known outside; if no trial is inside, t = 0 (θ_old exactly). So KL ≤ ε always holds for the
    parameters left in place, on this batch, whatever the optimiser and learning rate.
    """

    def measured() -> float:
        return float(mean_over_ranks(kl_now().detach().double().reshape(1))[0])

    kl_raw = measured()
    if kl_raw <= bound:
        return StepProjection(1.0, kl_raw, kl_raw)
    new = [p.detach().clone() for p in params]
    delta = [n - o for n, o in zip(new, old)]

    def move_to(t: float) -> None:
        for p, o, d in zip(params, old, delta):
            p.copy_(torch.add(o, d, alpha=t))

    inside, inside_kl, outside = 0.0, 0.0, 1.0
    t = math.sqrt(bound / kl_raw)
    for _ in range(trials):
        move_to(t)
        kl = measured()
        if kl <= bound:
            inside, inside_kl = t, kl
        else:
            outside = t
        t = 0.5 * (inside + outside)
    if inside == 0.0:
        for p, o in zip(params, old):
            p.copy_(o)
    else:
        move_to(inside)
    return StepProjection(inside, kl_raw, inside_kl)
