"""The DAPS proxy posterior: invariants, numerical range, and the exact q~ on an enumerable space."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ngkit.plugins import get_registry
from ngkit_plugins.daps_proxy import DapsProxy, proxy_weights

F64 = torch.float64


def _batch(k: int = 8, b: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logp = -50.0 + 5.0 * torch.randn(k, b, generator=g, dtype=F64)
    logq = -10.0 + 2.0 * torch.randn(k, b, generator=g, dtype=F64)
    return logp, logq


def _reference_weights(logp: torch.Tensor, logq: torch.Tensor, eta: float, beta: float) -> torch.Tensor:
    """docs/daps.md step 5, the paper's form: softmax_k((A + η·logq)/(η+β) − logq), float64."""
    a = logp - torch.logsumexp(logp, dim=0, keepdim=True)
    return torch.softmax((a + eta * logq) / (eta + beta) - logq, dim=0)


def test_registered() -> None:
    assert get_registry().get("posterior_proxies", "daps").factory is DapsProxy


@pytest.mark.parametrize("eta,beta", [(1.0, 0.0), (3.0, 2.0), (100.0, 50.0), (0.1, 0.01)])
def test_weights_normalised_and_match_paper_form(eta: float, beta: float) -> None:
    logp, logq = _batch()
    out = DapsProxy()(logp, logq, eta, beta)
    assert out.weights.shape == logp.shape
    torch.testing.assert_close(out.weights.sum(0), torch.ones(logp.shape[1], dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.weights, _reference_weights(logp, logq, eta, beta), rtol=1e-10, atol=1e-14)
    k = logp.shape[0]
    assert 1.0 <= out.ess.item() <= k
    assert 0.0 <= out.kl.item() <= math.log(k)
    # ESS and KL as defined: mean_b 1/Σw², mean_b Σ w log(K w).
    w = out.weights
    torch.testing.assert_close(out.ess, (1 / (w**2).sum(0)).mean())
    torch.testing.assert_close(out.kl, (w * torch.log(k * w)).sum(0).mean())


def test_large_eta_without_prior_gives_uniform_weights() -> None:
    logp, logq = _batch()
    out = proxy_weights(logp, logq, 1e6, 0.0)
    k = logp.shape[0]
    torch.testing.assert_close(out.weights, torch.full_like(logp, 1 / k), rtol=0, atol=1e-5)
    assert out.ess.item() == pytest.approx(k, rel=1e-8)
    assert out.kl.item() == pytest.approx(0.0, abs=1e-9)


def test_small_eta_gives_one_hot_on_best_sample() -> None:
    logp, logq = _batch()
    out = proxy_weights(logp, logq, 1e-3, 0.0)
    best = torch.nn.functional.one_hot(logp.argmax(0), logp.shape[0]).T.to(F64)
    torch.testing.assert_close(out.weights, best, rtol=0, atol=1e-12)
    assert out.ess.item() == pytest.approx(1.0)
    assert out.kl.item() == pytest.approx(math.log(logp.shape[0]))


@pytest.mark.parametrize("baseline", ["logsumexp", "mean"])
def test_per_image_reward_shift_changes_nothing(baseline: str) -> None:
    logp, logq = _batch()
    shift = torch.tensor([0.0, 1e3, -7.5, 3e5, -1e5], dtype=F64)
    a = proxy_weights(logp, logq, 2.0, 0.5, baseline)  # type: ignore[arg-type]
    b = proxy_weights(logp + shift, logq, 2.0, 0.5, baseline)  # type: ignore[arg-type]
    torch.testing.assert_close(a.weights, b.weights, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a.advantages, b.advantages, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(a.ess, b.ess)
    torch.testing.assert_close(a.kl, b.kl)


def test_baseline_changes_only_advantages() -> None:
    logp, logq = _batch()
    lse = DapsProxy("logsumexp")(logp, logq, 2.0, 0.5)
    mean = DapsProxy("mean")(logp, logq, 2.0, 0.5)
    torch.testing.assert_close(lse.weights, mean.weights, rtol=0, atol=0)
    torch.testing.assert_close(mean.advantages, logp - logp.mean(0))
    torch.testing.assert_close(lse.advantages, logp - torch.logsumexp(logp, 0))
    with pytest.raises(ValueError, match="baseline"):
        DapsProxy("median")  # type: ignore[arg-type]


@pytest.mark.parametrize("eta", [1e-3, 1e-1, 1.0, 1e2, 1e4, 1e6])
@pytest.mark.parametrize("beta", [0.0, 1.0, 50.0])
def test_stable_for_huge_rewards_in_float32(eta: float, beta: float) -> None:
    """float32 rewards near −1e6 (spacing 0.0625 nats) give the weights of the same rewards
    shifted to 0 in float64, i.e. the offset costs no precision."""
    g = torch.Generator().manual_seed(1)
    small = (3.0 * torch.randn(8, 4, generator=g)).double()
    logp32 = (-1e6 + small).float()
    logq32 = (-7000.0 + 20.0 * torch.randn(8, 4, generator=g)).float()  # 1024 tokens × log 1024 codes
    out = proxy_weights(logp32, logq32, eta, beta)
    shifted = logp32.double() + 1e6  # exact in float64
    ref = _reference_weights(shifted, logq32.double(), eta, beta)
    assert torch.isfinite(out.weights).all() and torch.isfinite(out.ess) and torch.isfinite(out.kl)
    torch.testing.assert_close(out.weights, ref, rtol=1e-9, atol=1e-12)
    # A float32 logsumexp near 1e6 would be off by up to 0.03 nats.
    torch.testing.assert_close(out.advantages, shifted - torch.logsumexp(shifted, 0), rtol=0, atol=1e-9)
    assert out.weights.dtype == F64


def test_differentiable_in_eta() -> None:
    """d ESS / d log η by autograd equals a central finite difference (used by the ``ess`` policy)."""
    logp, logq = _batch()
    log_eta = torch.tensor(math.log(5.0), dtype=F64, requires_grad=True)
    proxy_weights(logp, logq, log_eta.exp(), 0.5).ess.backward()
    h = 1e-6
    ess = [proxy_weights(logp, logq, math.exp(math.log(5.0) + d), 0.5).ess.item() for d in (h, -h)]
    assert log_eta.grad is not None
    assert log_eta.grad.item() == pytest.approx((ess[0] - ess[1]) / (2 * h), rel=1e-6)
    assert log_eta.grad.item() > 0  # larger η → flatter weights → larger ESS


# --- Enumerable latent space: 2 tokens × 3 codes = 9 states --------------------------------------

TOKENS, CODES = 2, 3
STATES = torch.tensor(list(itertools.product(range(CODES), repeat=TOKENS)))  # [9, 2]


def _factorised_q(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities [L, V] and the joint log q over the 9 states."""
    g = torch.Generator().manual_seed(seed)
    token_logq = torch.log_softmax(torch.randn(TOKENS, CODES, generator=g, dtype=F64), dim=-1)
    logq_states = token_logq[torch.arange(TOKENS), STATES].sum(-1)
    return token_logq, logq_states


def _closed_form(logq: torch.Tensor, r: torch.Tensor, eta: float, beta: float) -> torch.Tensor:
    """q~ = q^(η/(η+β)) exp(r/(η+β)) / Z over all states."""
    return torch.softmax(eta / (eta + beta) * logq + r / (eta + beta), dim=0)


@pytest.mark.parametrize("eta,beta", [(1.0, 0.0), (0.7, 0.3), (10.0, 2.0)])
def test_enumerated_states_give_the_closed_form(eta: float, beta: float) -> None:
    """With each state passed once (not drawn from q), w ∝ q~/q, so q~ = w·q / Σ w·q."""
    _, logq = _factorised_q(0)
    r = 3.0 * torch.randn(len(STATES), generator=torch.Generator().manual_seed(1), dtype=F64)
    w = proxy_weights(r[:, None], logq[:, None], eta, beta).weights[:, 0]
    implied = w * logq.exp() / (w * logq.exp()).sum()
    torch.testing.assert_close(implied, _closed_form(logq, r, eta, beta), rtol=1e-12, atol=1e-15)


def test_sampled_weights_converge_to_q_tilde() -> None:
    """20k samples from q: the weight mass landing on each state is a self-normalised estimate of
    q~(s). Its delta-method standard error, computed exactly over the 9 states, sets the tolerance."""
    eta, beta, n = 1.0, 0.5, 20_000
    token_logq, logq = _factorised_q(2)
    r = torch.randn(len(STATES), generator=torch.Generator().manual_seed(3), dtype=F64)
    g = torch.Generator().manual_seed(4)
    z = torch.stack([torch.multinomial(token_logq[l].exp(), n, True, generator=g) for l in range(TOKENS)], -1)
    index = z[:, 0] * CODES + z[:, 1]  # row of STATES (itertools.product order)
    w = proxy_weights(r[index][:, None], logq[index][:, None], eta, beta).weights[:, 0]
    estimate = torch.zeros(len(STATES), dtype=F64).index_add_(0, index, w)

    q, q_tilde = logq.exp(), _closed_form(logq, r, eta, beta)
    rho = q_tilde / q
    indicator = torch.eye(len(STATES), dtype=F64)  # [state s, sampled state]
    se = ((q * rho**2 * (indicator - q_tilde[:, None]) ** 2).sum(1) / n).sqrt()
    assert ((estimate - q_tilde).abs() < 4 * se).all(), (estimate, q_tilde, se)
    assert (se < 0.01).all()  # the check is not vacuous


@pytest.mark.parametrize("eta,beta", [(1.0, 0.0), (0.5, 0.25), (4.0, 2.0)])
def test_proxy_is_a_natural_gradient_step(eta: float, beta: float) -> None:
    """log q~ − log q = F⁺ ∇_θ (E_q[r] − β KL(q‖uniform)) / (η+β) + const for softmax logits θ."""
    n = len(STATES)
    g = torch.Generator().manual_seed(5)
    theta = torch.randn(n, generator=g, dtype=F64, requires_grad=True)
    r = 2.0 * torch.randn(n, generator=g, dtype=F64)
    logq = torch.log_softmax(theta, 0)
    q = logq.exp()
    objective = (q * r).sum() - beta * (q * (logq + math.log(n))).sum()
    (grad,) = torch.autograd.grad(objective, theta)
    qd = q.detach()
    fisher = torch.diag(qd) - torch.outer(qd, qd)
    natural = torch.linalg.pinv(fisher) @ grad

    w = proxy_weights(r[:, None], logq.detach()[:, None], eta, beta).weights[:, 0]
    log_q_tilde = torch.log(w * qd / (w * qd).sum())
    gap = log_q_tilde - logq.detach() - natural / (eta + beta)
    assert (gap.max() - gap.min()).item() < 1e-9
    assert (natural.max() - natural.min()).item() > 1.0  # a non-trivial step


def test_weighted_max_likelihood_recovers_q_tilde() -> None:
    """Fitting logits by −Σ w log q_θ over the enumerated states (w = q~) recovers q~: the policy
    loss's fixed point is the proxy."""
    eta, beta = 0.8, 0.4
    _, logq = _factorised_q(6)
    r = 2.0 * torch.randn(len(STATES), generator=torch.Generator().manual_seed(7), dtype=F64)
    w = proxy_weights(r[:, None], logq[:, None], eta, beta).weights[:, 0]
    target = w * logq.exp() / (w * logq.exp()).sum()

    theta = logq.clone().requires_grad_(True)  # start from q
    opt = torch.optim.LBFGS(
        [theta], max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -(target * torch.log_softmax(theta, 0)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(torch.softmax(theta, 0).detach(), target, rtol=1e-7, atol=1e-9)
    assert (target - logq.exp()).abs().max() > 0.05  # q~ is a real move away from q
