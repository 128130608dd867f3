"""The DAPS proxy posterior q~ over the K samples of each image (docs/daps.md, step 5 and "The proxy").

q~(z|x) ∝ q(z|x)^(η/(η+β)) · exp(r(z)/(η+β)) solves max E_q~[r] − β·KL(q~‖uniform) subject
to KL(q~‖q) ≤ ε, with η the multiplier of the trust region. On samples z_k ~ q the ratio is
q~/q ∝ exp((r − β·log q)/(η+β)), so the self-normalised importance weights are

    w[k, b] = softmax_k((A[k, b] − β·logq[k, b]) / (η+β)),    A = r − logsumexp_k r.

Exactly, q~/q = u / E_q[u] with u = exp((r − β·log q)/(η+β)); replacing E_q[u] by the sample
mean (1/K) Σ_j u_j gives q~/q ≈ K·w on the samples, hence the sample KL estimate
KL(q~‖q) = E_q~[log q~/q] ≈ Σ_k w log(K·w) = KL(w ‖ uniform over K): always in [0, log K],
0 for uniform weights and log K for one-hot weights (so a bound ≥ log K can never bind).

Per-token credit (factorised q, docs/daps.md "Per-token credit"): with a reward per token r_l and
q(z|x) = Π_l q_l(z_l|x), the proxy of an additive reward Σ_l r_l(z_l) is the product of per-token
proxies q~_l ∝ q_l^(η/(η+β))·exp(r_l/(η+β)), so each token's weights are the formula above on its
own column: ``proxy_weights`` of ``[K, B*L]`` rewards (:func:`patch_rewards` makes them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from ngkit import hookimpl
from ngkit.components import ProxyWeights, Register

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")

Baseline = Literal["logsumexp", "mean"]

# Range of η (nats of reward per nat of KL). At 1e-3 a reward gap of 0.05 nats already gives
# weight ratios of e^-50 (one-hot); at 1e6 weights stay within 1 % of uniform for spreads < 1e4 nats.
ETA_MIN = 1e-3
ETA_MAX = 1e6
LOG_ETA_MIN = math.log(ETA_MIN)
LOG_ETA_MAX = math.log(ETA_MAX)


def solve_log_eta(kl: Callable[[Tensor], Tensor], bound: float, iterations: int, like: Tensor) -> Tensor:
    """log η where ``kl(log η)``, a KL that decreases in η, meets ``bound``: bisection on
    [LOG_ETA_MIN, LOG_ETA_MAX] for ``iterations`` steps, returning the upper end of the final
    bracket (so KL ≤ bound unless even ETA_MAX exceeds it), or LOG_ETA_MIN where the bound does
    not bind there (the largest step allowed). ``torch.where`` instead of Python branches: no
    host-device sync inside the loop. ``like`` gives the dtype and device."""
    lo, hi = like.new_tensor(LOG_ETA_MIN), like.new_tensor(LOG_ETA_MAX)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        too_far = kl(mid) > bound
        lo = torch.where(too_far, mid, lo)
        hi = torch.where(too_far, hi, mid)
    not_binding = kl(like.new_tensor(LOG_ETA_MIN)) <= bound
    return torch.where(not_binding, like.new_tensor(LOG_ETA_MIN), hi)


def _baseline_error(baseline: object) -> str:
    return f'posterior proxy "daps": baseline must be "logsumexp" or "mean", got {baseline!r}'


def patch_rewards(pixels: Tensor, grid: tuple[int, int]) -> Tensor:
    """Per-pixel log-likelihoods ``[N, C, H, W]`` summed over each token's patch -> ``[N, L]``,
    tokens row-major on the latent ``grid`` (rows, cols); patches are H/rows × W/cols pixels."""
    n, c, h, w = pixels.shape
    rows, cols = grid
    patches = pixels.reshape(n, c, rows, h // rows, cols, w // cols)
    return patches.sum(dim=(1, 3, 5)).reshape(n, rows * cols)


def _lse_advantages(logp: Tensor) -> Tensor:
    """A = r − logsumexp_k r in float64 (stop-gradient). Subtracting the per-image maximum first is
    exact in float64 for float32 rewards, so rewards of order −1e6 nats keep full precision."""
    r = logp.detach().double()
    centred = r - r.amax(dim=0, keepdim=True)
    return centred - torch.logsumexp(centred, dim=0, keepdim=True)


def weight_logits(logp: Tensor, logq: Tensor, beta: float) -> Tensor:
    """``A − β·logq`` in float64, stop-gradient: w = softmax_k(weight_logits / (η+β))."""
    return _lse_advantages(logp) - beta * logq.detach().double()


def sample_kl(log_w: Tensor) -> Tensor:
    """mean_b Σ_k w log(K·w): the self-normalised estimate of KL(q~‖q) from log-weights [K, B]."""
    return (log_w.exp() * (log_w + math.log(log_w.shape[0]))).sum(dim=0).mean()


def proxy_weights(
    logp: Tensor, logq: Tensor, eta: float | Tensor, beta: float, baseline: Baseline = "logsumexp"
) -> ProxyWeights:
    """Weights, advantages, ESS and sample KL of q~ for rewards ``logp [K, B]``; float64 outputs.

    ``eta`` may carry a gradient (the ``ess`` step-size policy differentiates ESS(η)). Float64
    throughout, so η from 1e-3 to 1e6 and rewards of order −1e6 nats lose no precision.
    The weights do not depend on the baseline (softmax is shift-invariant per image).
    """
    if baseline not in ("logsumexp", "mean"):
        raise ValueError(_baseline_error(baseline))
    lse_advantages = _lse_advantages(logp)
    logits = lse_advantages - beta * logq.detach().double()
    if baseline == "logsumexp":
        advantages = lse_advantages
    else:
        r = logp.detach().double()
        advantages = r - r.mean(dim=0, keepdim=True)
    eta_t = torch.as_tensor(eta, dtype=torch.float64, device=logits.device)  # keeps η's autograd graph
    log_w = torch.log_softmax(logits / (eta_t + beta), dim=0)
    w = log_w.exp()
    ess = (1.0 / (w * w).sum(dim=0)).mean()
    return ProxyWeights(weights=w, advantages=advantages, ess=ess, kl=sample_kl(log_w))


class DapsProxy:
    """The paper's proxy; ``baseline`` changes only the logged advantages, never the weights."""

    def __init__(self, baseline: Baseline = "logsumexp") -> None:
        if baseline not in ("logsumexp", "mean"):
            raise ValueError(_baseline_error(baseline))
        self.baseline = baseline

    def __call__(self, logp: Tensor, logq: Tensor, eta: float | Tensor, beta: float) -> ProxyWeights:
        return proxy_weights(logp, logq, eta, beta, baseline=self.baseline)


@hookimpl
def register_posterior_proxies(register: Register) -> None:
    register("daps", DapsProxy)
