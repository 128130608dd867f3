"""The encoder's real step, measured and bounded (docs/daps.md "The encoder's real step").

The proxy's trust region bounds KL(q~‖q), not how far the encoder moves: the encoder is fitted to
q~ by the engine's optimiser (AdamW, fixed learning rate), whose step does not depend on η. Here
the step is measured as KL(q_old(·|x) ‖ q_new(·|x)) per image across the optimiser step, and,
as an option, bounded MPO-style (Abdolmaleki et al., 2018, M-step): the policy loss gains
α·KL(q_prev ‖ q_θ) and the multiplier α is learned by dual ascent so the measured KL stays near ε.
Public API (:mod:`ngkit.methods`): the DAPS method plugin uses it; so may any method plugin.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ngkit.distributed import mean_over_ranks

# Range of the multiplier α (nats of policy loss per nat of KL); the upper end stops a run whose
# bound cannot be met from overflowing, the lower one lets log α come back within ~20 updates.
ALPHA_MIN = 1e-3
ALPHA_MAX = 1e6
# A step that did not move the encoder at all still lowers log α by a bounded amount.
KL_RATIO_MIN = 1e-3


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
