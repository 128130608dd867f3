"""First-order per-token credit for DAPS-NA (``[method] credit = "first-order"``; docs/daps.md,
"First-order credit").

With ``credit = "token"`` each token learns only about the K codes its samples drew (8 of 256).
Here every code of every token gets a reward estimate from one backward pass through the decoder:
the decoder's input is the soft one-hot Z ``[K·B, L, V]`` of the drawn codes (the Decoder
contract's ``embed`` takes soft one-hots), and

    r^_l(c) = (1/K) Σ_k ∂ log p(x | Z_k) / ∂Z_k[l, c]

is, to first order in the embedding, the change of the image's log-likelihood when token l of a
sample switches to code c (plus a constant per token, which the proxy ignores), averaged over
the K samples as linearisation points. It counts a token's effect on every pixel, its
neighbours' patches included, where the patch reward credits only its own patch. The proxy is
DAPS's formula on all V codes at once instead of on K samples:

    q~_l(c) ∝ q_l(c)^(η/(η+β)) · exp(r^_l(c)/(η+β)),

the maximiser of E_q~[r^_l] − β·KL(q~_l ‖ uniform) − η·KL(q~_l ‖ q_l), with one η per batch solved
so that the mean over images and tokens of the exact KL(q~_l ‖ q_l) (a sum over V, no sampling)
equals the step-size policy's bound. The encoder is fitted by the cross-entropy to q~_l over all
V codes. When the reward is linear in the one-hot (an embedding followed by a linear read-out),
r^_l is the exact reward difference and q~ is the exact per-token proxy (tests/test_daps_first_order.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ngkit.components import Decoder
from ngkit_plugins.daps_proxy import solve_log_eta

ITERATIONS = 40  # bisection steps in log η: bracket (log 1e9 ≈ 20.7) / 2^40, far below float precision of use

LogProb = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def first_order_rewards(
    log_prob: LogProb, decoder: Decoder, x: Tensor, z: Tensor, codes: int, curvature: float = 0.0
) -> tuple[Tensor, Tensor]:
    """log p(x|z) ``[K, B]`` with gradient into the decoder, and r^ ``[B, L, V]`` (no gradient):
    the decoder log-likelihood's gradient with respect to each token's one-hot, mean over K.
    ``log_prob`` is the method's :meth:`CategoricalVAE.decoder_log_prob` (it takes soft one-hots).

    ``curvature`` λ > 0 subtracts (λ/2)·‖e_c − h_l‖², the squared distance in the decoder's
    embedding space from the sample's own embedding h_l = e_(z_l) to code c's e_c, from each
    code's linear estimate: a local quadratic model of the reward, so codes far from where the
    gradient was taken are not credited with its extrapolation (maximising it picks the code
    nearest to h_l + g_l/λ, a VQ step). It needs an embedding without position terms (every
    built-in one): e_c = ``decoder.embed`` of code c's one-hot."""
    onehot = torch.nn.functional.one_hot(z, codes).to(x.dtype).requires_grad_(True)  # [K, B, L, V]
    logp, _ = log_prob(x, onehot)
    (grad,) = torch.autograd.grad(logp.sum(), onehot, retain_graph=True)
    reward = grad.mean(0)
    if curvature > 0:
        with torch.no_grad():
            table = decoder.embed(torch.eye(codes, dtype=x.dtype, device=x.device).unsqueeze(0))[0]  # [V, d]
            gram = table @ table.T  # <e_c, e_c'>; <e_c, h_l> = gram[z_l, c]
            # −(λ/2)(‖e_c‖² − 2<e_c, h_l>); ‖h_l‖² is the same for every code and drops out
            reward = reward - 0.5 * curvature * (gram.diagonal() - 2 * gram[z].mean(0))
    return logp, reward


def _proxy_logits(logq: Tensor, reward: Tensor, log_eta: Tensor, beta: float) -> Tensor:
    eta = log_eta.exp()
    return torch.log_softmax((eta * logq + reward) / (eta + beta), dim=-1)


def _mean_kl(log_target: Tensor, logq: Tensor) -> Tensor:
    return (log_target.exp() * (log_target - logq)).sum(-1).mean()


def dense_token_proxy(logq: Tensor, reward: Tensor, bound: float, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """The proxy on all codes: ``logq`` the encoder's log-probabilities and ``reward`` r^, both
    ``[..., V]`` (any leading shape, one column per image and token). Returns the proxy's
    log-probabilities (float64, no gradient), η and the mean exact KL(q~ ‖ q) it reaches.

    η is the upper end of a bisection bracket in log η on the mean KL, which decreases in η: the
    KL is ≤ ``bound`` unless even η = 1e6 exceeds it (then η = 1e6); η = 1e-3 where the bound
    does not bind (β > 0 can cap the KL below it)."""
    logq64, reward64 = logq.detach().double(), reward.detach().double()
    reward64 = reward64 - reward64.amax(-1, keepdim=True)  # shift per column: exact, and no overflow

    def kl(log_eta: Tensor) -> Tensor:
        return _mean_kl(_proxy_logits(logq64, reward64, log_eta, beta), logq64)

    log_eta = solve_log_eta(kl, bound, ITERATIONS, logq64)
    log_target = _proxy_logits(logq64, reward64, log_eta, beta)
    return log_target, log_eta.exp(), _mean_kl(log_target, logq64)
