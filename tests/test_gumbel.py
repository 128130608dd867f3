"""Gumbel-Softmax and GR-MCK: relaxed samples against closed forms, conditional Gumbels against
their defining properties, and the Rao-Blackwellised gradient against straight-through Gumbel.

Statistical checks use N independent draws and a 5-standard-error tolerance (seeded)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from toy_models import toy_pair

from ngkit_plugins.gumbel_methods import GumbelSoftmax, conditional_gumbel, gumbel_rao, kl_to_uniform

N = 40_000
EULER_GAMMA = 0.5772156649  # mean of the standard Gumbel distribution


pytestmark = pytest.mark.usefixtures("one_thread")


def fixed_logits_encoder(logits: list[float]):
    """Toy encoder (1 token) whose q(z|x) is softmax(logits) for every image."""
    encoder, _ = toy_pair(tokens=1, codes=len(logits))
    with torch.no_grad():
        encoder.head.weight.zero_()
        encoder.head.bias.copy_(torch.tensor(logits))
    return encoder


def two_class_relaxed_mean(delta: float, tau: float) -> float:
    """E[y_0] for y = softmax((l + G) / τ) with V = 2: y_0 = sigmoid((Δ + U) / τ) where
    Δ = l_0 - l_1 and U = G_0 - G_1 ~ Logistic(0, 1); integrated numerically (float64)."""
    u = torch.linspace(-60, 60, 400_001, dtype=torch.float64)
    density = torch.sigmoid(u) * torch.sigmoid(-u)
    return torch.trapezoid(torch.sigmoid((delta + u) / tau) * density, u).item()


def test_relaxed_sample_converges_to_the_categorical_as_temperature_falls() -> None:
    torch.manual_seed(0)
    encoder = fixed_logits_encoder([2.0, 0.5, 0.0, -1.0])
    x = torch.rand(N, 1, 4, 4)
    probs = F.softmax(torch.tensor([2.0, 0.5, 0.0, -1.0]), dim=-1)
    tol = 5 * (probs * (1 - probs) / N).sqrt()
    gaps = {}
    for tau in (1.0, 0.02):
        y, logits = encoder.relaxed_sample(x, tau, hard=False)
        torch.testing.assert_close(logits.exp()[0, 0], probs)
        freq = F.one_hot(y[:, 0].argmax(-1), 4).float().mean(0)
        assert ((freq - probs).abs() < tol).all()  # argmax is an exact categorical sample
        gaps[tau] = (y[:, 0].mean(0) - probs).abs()
    assert (gaps[0.02] < tol).all()  # the relaxed sample itself is one-hot in the limit
    assert gaps[1.0].max() > 10 * tol.max()


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_two_class_relaxed_mean_matches_closed_form(tau: float) -> None:
    torch.manual_seed(1)
    logits = torch.tensor([0.7, -0.3])
    expected = two_class_relaxed_mean(1.0, tau)
    # The encoder's relaxed sample...
    y, _ = fixed_logits_encoder(logits.tolist()).relaxed_sample(torch.rand(N, 1, 4, 4), tau, hard=False)
    assert y[:, 0, 0].mean().item() == pytest.approx(expected, abs=5 * y[:, 0, 0].std().item() / math.sqrt(N))
    # ...and the GR-MCK noise: z ~ q, then Gumbels conditioned on z, is marginally the same.
    rows = logits.expand(N, 2)
    z = torch.distributions.Categorical(logits=rows).sample()
    y = F.softmax((rows + conditional_gumbel(rows, z, 1)[0]) / tau, dim=-1)[:, 0]
    assert y.mean().item() == pytest.approx(expected, abs=5 * y.std().item() / math.sqrt(N))


def test_conditional_gumbels_have_the_given_argmax_and_gumbel_marginals() -> None:
    torch.manual_seed(2)
    logits = torch.tensor([1.5, 0.0, -2.0, -6.0, 0.3])
    rows = logits.expand(N, 5)
    z = torch.arange(N) % 5  # every code, including the improbable -6.0
    noise = conditional_gumbel(rows, z, 3)
    assert torch.equal((rows + noise).argmax(-1), z.expand(3, N))
    # With z drawn from q the noise is unconditionally i.i.d. standard Gumbel.
    z = torch.distributions.Categorical(logits=rows).sample()
    g = conditional_gumbel(rows, z, 1)[0]
    mean_tol = 5 * math.pi / math.sqrt(6 * N)
    assert (g.mean(0) - EULER_GAMMA).abs().max() < mean_tol
    assert (g.var(0) - math.pi**2 / 6).abs().max() < 0.1
    cdf_at_zero = (g <= 0).float().mean(0)  # P(G <= 0) = exp(-1)
    assert (cdf_at_zero - math.exp(-1)).abs().max() < 5 * math.sqrt(0.25 / N)


def per_row_gradients(estimator, logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Gradient of sum(weights * y) w.r.t. each row's own copy of the logits, ``[N, V]``."""
    rows = logits.expand(N, -1).clone().requires_grad_()
    (estimator(F.log_softmax(rows, -1)) * weights).sum().backward()
    return rows.grad


def test_gr_mck_expected_gradient_equals_straight_through_gumbel() -> None:
    """E[∇ GR-MCK] = E_D[E[∇ softmax((θ+G)/τ) | D]] = E_G[∇ softmax((θ+G)/τ)] = E[∇ ST-GS] by the
    tower rule (the noise is not differentiated); the conditioning only removes variance."""
    torch.manual_seed(3)
    logits, weights, tau = torch.tensor([1.0, 0.2, -0.5, -1.0]), torch.tensor([1.0, -2.0, 0.5, 3.0]), 0.7

    def st_gumbel(lp: torch.Tensor) -> torch.Tensor:
        return F.gumbel_softmax(lp, tau=tau, hard=True)

    def gr_mck(lp: torch.Tensor) -> torch.Tensor:
        z = torch.distributions.Categorical(logits=lp.detach()).sample()
        return gumbel_rao(lp, z, 10, tau)

    st, gr = per_row_gradients(st_gumbel, logits, weights), per_row_gradients(gr_mck, logits, weights)
    se = (st.var(0) / N + gr.var(0) / N).sqrt()
    assert ((st.mean(0) - gr.mean(0)).abs() < 5 * se).all()
    assert gr.var(0).sum() < 0.5 * st.var(0).sum()  # the point of Rao-Blackwellisation
    assert st.mean(0).abs().max() > 10 * se.max()  # the compared gradient is not ~0


def test_gumbel_rao_forward_is_the_hard_sample() -> None:
    logits = torch.randn(3, 2, 6)
    z = torch.randint(6, (3, 2))
    assert torch.equal(gumbel_rao(logits, z, 4, 0.5), F.one_hot(z, 6).float())


def test_kl_to_uniform_by_hand() -> None:
    uniform = torch.zeros(2, 3, 4)
    torch.testing.assert_close(kl_to_uniform(uniform), torch.zeros(2))
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    expected = 3 * (0.5 * math.log(2) + 0.25 * math.log(1) + 0.25 * math.log(0.5))  # 3 x sum p log(4p)
    torch.testing.assert_close(kl_to_uniform(p.log().expand(1, 3, 4)), torch.tensor([expected]))


def test_temperature_anneals_exponentially() -> None:
    encoder, decoder = toy_pair()
    method = GumbelSoftmax(
        encoder=encoder,
        decoder=decoder,
        beta=lambda step: 0.0,
        total_steps=100,
        temperature_start=2.0,
        temperature_end=0.5,
    )
    assert method.temperature(0) == pytest.approx(2.0)
    assert method.temperature(50) == pytest.approx(1.0)  # geometric mean
    assert method.temperature(100) == method.temperature(1000) == pytest.approx(0.5)
