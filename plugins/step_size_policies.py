"""Step-size policies for the DAPS trust-region multiplier η (docs/daps.md, step 6 and "Step-size policies").

Small η → large step (weights concentrate, ESS falls, KL(q~‖q) grows); large η → small step.
Every policy returns η as a detached float64 scalar on the rewards' device, within
[ETA_MIN, ETA_MAX]. ESS and KL are those of the DAPS proxy
(:func:`ngkit_plugins.daps_proxy.proxy_weights`) whatever proxy the method uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ngkit import hookimpl
from ngkit.components import Register
from ngkit.distributed import mean_over_ranks
from ngkit_plugins.daps_proxy import (
    ETA_MAX,
    ETA_MIN,
    LOG_ETA_MAX,
    LOG_ETA_MIN,
    proxy_weights,
    sample_kl,
    solve_log_eta,
    weight_logits,
)

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")


class FixedEta(nn.Module):
    """A constant η (ablations; the paper's initial η is 100)."""

    def __init__(self, eta: float = 100.0) -> None:
        super().__init__()
        if not ETA_MIN <= eta <= ETA_MAX:
            raise ValueError(f'step size "fixed": eta must be in [{ETA_MIN:g}, {ETA_MAX:g}], got {eta}')
        self.value = eta

    def eta(self, logp: Tensor, logq: Tensor, beta: float) -> Tensor:
        return torch.tensor(self.value, dtype=torch.float64, device=logp.device)

    def update(self, logp: Tensor, logq: Tensor, beta: float) -> dict[str, float]:
        return {}


class KlBoundEta(nn.Module):
    """η solved per batch so that the sample KL(q~‖q) (mean over images) equals ``bound``.

    This is the root of the derivative of the 1-D convex REPS dual, g'(η) = ε − KL(q~_η‖q); KL is
    monotone decreasing in η, so bisection in log η finds it. The returned η is the upper end of
    the final bracket: KL ≤ bound holds, and η exceeds the exact root by at most ``TOL_LOG_ETA``
    in log η.

    Not binding: if KL at ETA_MIN is already ≤ bound (e.g. bound ≥ log K, the most the K-sample
    estimate can reach), η = ETA_MIN, the largest step allowed. Cannot be met: if KL at ETA_MAX
    still exceeds the bound (reward spreads of order ETA_MAX nats), η = ETA_MAX and the logged
    ``kl`` shows the excess. Default bound 1.0 nats ≈ the paper's operating point: with K = 8, the
    η giving ESS = 0.33·K (CIFAR) gives a sample KL of 0.94–1.04 nats and ESS = 0.25·K
    (ImageNet) gives 1.28–1.34 nats, for normal, exponential and Student-t reward spreads.
    Each rank solves its own batch; η is not synchronised across ranks.
    """

    TOL_LOG_ETA = 1e-4  # bracket width in log η at the end (0.01 % in η)

    def __init__(self, bound: float = 1.0) -> None:
        super().__init__()
        if not bound > 0:
            raise ValueError(f'step size "kl": bound must be > 0 nats, got {bound}')
        self.bound = bound
        self.iterations = math.ceil(math.log2((LOG_ETA_MAX - LOG_ETA_MIN) / self.TOL_LOG_ETA))

    def eta(self, logp: Tensor, logq: Tensor, beta: float) -> Tensor:
        logits = weight_logits(logp, logq, beta)

        def kl(log_eta: Tensor) -> Tensor:
            return sample_kl(torch.log_softmax(logits / (log_eta.exp() + beta), dim=0))

        return solve_log_eta(kl, self.bound, self.iterations, logits).exp()

    def update(self, logp: Tensor, logq: Tensor, beta: float) -> dict[str, float]:
        return {}


class LearnedEssEta(nn.Module):
    """The paper's policy: log η learned by Adam on (ESS(η) − target·K)², one step per taken step.

    State (log η, Adam moments, step count) lives in float64 buffers: checkpointed with the
    method, invisible to the model optimiser and DeepSpeed, and kept float64 when the module is
    cast to bf16/fp16 (a 1e-3 step in log η is below bf16's resolution of 0.03 at log 100).
    The gradient is averaged over ranks so η stays identical everywhere. Adam rather than the
    reference's AdamW: optax's default weight decay (1e-4 × lr 1e-3) moves log η by < 1e-6 a step.
    """

    BETAS = (0.9, 0.999)  # Adam defaults (torch and optax)
    EPS = 1e-8  # Adam default (torch and optax)

    log_eta: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    steps: Tensor

    def __init__(self, target: float = 0.25, lr: float = 1e-3, init: float = 100.0) -> None:
        super().__init__()
        if not 0 < target <= 1:
            raise ValueError(f'step size "ess": target is a fraction of K in (0, 1], got {target}')
        if not lr > 0:
            raise ValueError(f'step size "ess": lr must be > 0, got {lr}')
        if not ETA_MIN <= init <= ETA_MAX:
            raise ValueError(f'step size "ess": init must be in [{ETA_MIN:g}, {ETA_MAX:g}], got {init}')
        self.target = target
        self.lr = lr
        self.register_buffer("log_eta", torch.tensor(math.log(init), dtype=torch.float64))
        self.register_buffer("exp_avg", torch.zeros((), dtype=torch.float64))
        self.register_buffer("exp_avg_sq", torch.zeros((), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LearnedEssEta:
        """Follow device moves but never dtype casts (see the class docstring)."""
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(device=fn(buf).device)
        return self

    def eta(self, logp: Tensor, logq: Tensor, beta: float) -> Tensor:
        return self.log_eta.detach().exp().to(logp.device)

    def update(self, logp: Tensor, logq: Tensor, beta: float) -> dict[str, float]:
        k = logp.shape[0]
        with torch.enable_grad():
            log_eta = self.log_eta.detach().to(logp.device).requires_grad_(True)
            ess = proxy_weights(logp, logq, log_eta.exp(), beta).ess
            loss = (ess - self.target * k) ** 2
            (grad,) = torch.autograd.grad(loss, log_eta)
        self._adam_step(mean_over_ranks(grad).to(self.log_eta.device))
        return {"eta_loss": loss.item()}

    @torch.no_grad()
    def _adam_step(self, grad: Tensor) -> None:
        b1, b2 = self.BETAS
        self.steps += 1
        self.exp_avg.mul_(b1).add_(grad, alpha=1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        t = self.steps.to(torch.float64)
        m_hat = self.exp_avg / (1 - b1**t)
        v_hat = self.exp_avg_sq / (1 - b2**t)
        self.log_eta.sub_(self.lr * m_hat / (v_hat.sqrt() + self.EPS)).clamp_(LOG_ETA_MIN, LOG_ETA_MAX)


@hookimpl
def register_step_size_policies(register: Register) -> None:
    register("ess", LearnedEssEta)
    register("fixed", FixedEta)
    register("kl", KlBoundEta)
