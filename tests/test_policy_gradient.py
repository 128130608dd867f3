"""REINFORCE and PPO: unbiasedness against an enumerated gradient, PPO's objective and KL rule by
hand, and PPO's updates on samples from an older encoder."""

from __future__ import annotations

import math

import pytest
import torch
from toy_models import toy_pair

from ngkit.components import ImageSpec
from ngkit_plugins.policy_gradient_methods import (
    PPO,
    Reinforce,
    adapt_kl_coef,
    clipped_surrogate,
    leave_one_out,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_leave_one_out_by_hand() -> None:
    reward = torch.tensor([[1.0, 0.0], [2.0, 0.0], [6.0, 3.0]])  # K = 3 samples of 2 images
    expected = torch.tensor([[1 - 4.0, 0 - 1.5], [2 - 3.5, 0 - 1.5], [6 - 1.5, 3 - 0.0]])
    torch.testing.assert_close(leave_one_out(reward), expected)


def test_reinforce_gradient_is_unbiased() -> None:
    """Mean of many estimates vs the exact gradient of E_q[log p(x|z)] - β KL(q || uniform),
    enumerating all 3^2 codes of a 2-token encoder. Each image of a batch of B copies of x is an
    independent estimate, so -∇loss of one batch is the mean of B estimates."""
    torch.manual_seed(0)
    encoder, decoder = toy_pair(tokens=2, codes=3)
    beta = 0.5
    method = Reinforce(encoder=encoder, decoder=decoder, beta=lambda step: beta, samples=4)
    x = torch.rand(1, 1, 4, 4)
    params = list(encoder.parameters())

    every_z = torch.cartesian_prod(torch.arange(3), torch.arange(3))
    xs = x.expand(9, 1, 4, 4)
    logq = encoder.log_prob(xs, every_z).logq
    with torch.no_grad():
        logp = decoder.log_prob(xs, decoder(decoder.embed(every_z)))
    objective = (logq.exp() * (logp - beta * (logq + 2 * math.log(3)))).sum()
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(objective, params)])

    estimates = []
    for _ in range(20):
        method.zero_grad()
        method(x.expand(2000, 1, 4, 4), step=0).loss.backward()
        estimates.append(-torch.cat([p.grad.flatten() for p in params]))
    estimates = torch.stack(estimates)
    se = estimates.std(0) / math.sqrt(len(estimates))
    assert ((estimates.mean(0) - exact).abs() <= 6 * se + 1e-6).all()
    assert exact.abs().max() > 30 * se.max()  # a bias of a few percent would show


def test_reinforce_needs_two_samples() -> None:
    encoder, decoder = toy_pair()
    with pytest.raises(ValueError, match="at least 2"):
        Reinforce(encoder=encoder, decoder=decoder, beta=lambda step: 0.0, samples=1)


def test_clipped_surrogate_by_hand() -> None:
    ratio = torch.tensor([0.5, 1.1, 1.5, 0.9])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    logq = ratio.log().requires_grad_()
    loss, clip_frac = clipped_surrogate(logq, torch.zeros(4), advantages, clip=0.2)
    # min(ρA, clip(ρ)A): 0.5 (unclipped is smaller), -1.1, 1.2 (clipped), -0.9
    assert loss.item() == pytest.approx(-(0.5 - 1.1 + 1.2 - 0.9) / 4)
    assert clip_frac.item() == 0.5  # 0.5 and 1.5 lie outside [0.8, 1.2]
    loss.backward()
    # d/dlog q of -ρA/4 where the unclipped term is active, 0 where the clipped one is
    torch.testing.assert_close(logq.grad, torch.tensor([-0.5, 1.1, 0.0, 0.9]) / 4)


def test_kl_coefficient_rule_by_hand() -> None:
    assert adapt_kl_coef(1.0, kl=0.005, target=0.01) == 0.5  # below target / 1.5
    assert adapt_kl_coef(1.0, kl=0.012, target=0.01) == 1.0  # inside the band
    assert adapt_kl_coef(1.0, kl=0.02, target=0.01) == 2.0  # above 1.5 target
    assert adapt_kl_coef(1e3, kl=1.0, target=0.01) == 1e3  # clipped


def test_ppo_updates_on_samples_from_the_encoder_that_drew_them() -> None:
    torch.manual_seed(0)
    encoder, decoder = toy_pair(tokens=2, codes=5)
    method = PPO(encoder=encoder, decoder=decoder, beta=lambda step: 0.1, image=ImageSpec(1, 4, 4), samples=2)
    optimiser = torch.optim.SGD(method.parameters(), lr=1.0)
    x = torch.rand(8, 1, 4, 4)

    first = method(x, step=0)
    assert first.logs["old_kl"] == 0.0 and first.logs["clip_frac"] == 0.0  # nothing stored: ratio 1
    optimiser.zero_grad()
    first.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.value.parameters())
    optimiser.step()
    assert method.after_step(0) == {"kl_coef": 5.0}  # KL 0 < target / 1.5: halved

    second = method(x, step=1)  # the policy term now uses step 0's samples, ratio != 1
    assert second.logs["old_kl"] > 0.0 and second.logs["clip_frac"] > 0.0
    assert math.isfinite(second.loss.item())
