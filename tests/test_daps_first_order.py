"""First-order per-token credit (``credit = "first-order"``, docs/daps.md "First-order credit"):
the decoder-gradient reward is the exact reward difference when the reward is linear in the
one-hot, the dense proxy is DAPS's closed form on all codes with the KL bound met exactly, its
product over tokens is the enumerated proxy of the additive reward, and the method's loss is the
cross-entropy to it."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from toy_models import ToyDecoder, ToyEncoder

from ngkit.components import ImageSpec, LatentSpec
from ngkit_plugins.beta_schedules import Constant
from ngkit.methods.categorical_vae import CategoricalVAE
from ngkit_plugins.daps_first_order import dense_token_proxy, first_order_rewards
from ngkit_plugins.daps_method import Daps, DapsNA
from ngkit_plugins.daps_proxy import LOG_ETA_MIN, DapsProxy
from ngkit_plugins.step_size_policies import FixedEta, KlBoundEta

F64 = torch.float64
IMAGE, LATENT = ImageSpec(1, 4, 4), LatentSpec((1, 2), 3)


class LinearRewardDecoder(ToyDecoder):
    """log p(x|z) = <x, W·embed(z) + b>: linear in the one-hot, so first order is exact."""

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return (x * params).flatten(1).sum(-1)

    def pixel_log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return x * params


def _rewards(decoder: ToyDecoder, x: torch.Tensor, z: torch.Tensor, **kw: float) -> tuple[torch.Tensor, torch.Tensor]:
    """first_order_rewards through the log-likelihood a method gives it (CategoricalVAE's)."""
    log_prob = CategoricalVAE(ToyEncoder(IMAGE, LATENT), decoder).decoder_log_prob
    return first_order_rewards(log_prob, decoder, x, z, codes=3, **kw)


def _reward(decoder: ToyDecoder, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return decoder.log_prob(x, decoder(decoder.embed(z)))


def test_linear_reward_gives_the_exact_difference_of_every_swap() -> None:
    """r^_l(c) − r^_l(z_l) = r(z with z_l = c) − r(z) for every sample, token and code, whatever
    the K linearisation points (they agree for a linear reward), in float64."""
    torch.manual_seed(0)
    decoder = LinearRewardDecoder(IMAGE, LATENT).double()
    x = torch.rand(3, 1, 4, 4, dtype=F64)
    z = torch.randint(0, 3, (4, 3, 2))  # [K, B, L]
    logp, rhat = _rewards(decoder, x, z)
    torch.testing.assert_close(logp, torch.stack([_reward(decoder, x, zk) for zk in z]))
    for k, b, l, c in itertools.product(range(4), range(3), range(2), range(3)):
        swapped = z[k, b].clone()
        swapped[l] = c
        exact = _reward(decoder, x[b : b + 1], swapped[None]) - _reward(decoder, x[b : b + 1], z[k, b][None])
        first_order = rhat[b, l, c] - rhat[b, l, z[k, b, l]]
        torch.testing.assert_close(first_order, exact[0], rtol=1e-10, atol=1e-10)


def test_nonlinear_reward_is_the_gradient_averaged_over_samples() -> None:
    """For the Gaussian toy decoder r^ is the mean over K of autograd's gradient at each sample."""
    torch.manual_seed(1)
    decoder = ToyDecoder(IMAGE, LATENT).double()
    x = torch.rand(2, 1, 4, 4, dtype=F64)
    z = torch.randint(0, 3, (3, 2, 2))
    _, rhat = _rewards(decoder, x, z)
    grads = []
    for zk in z:
        onehot = torch.nn.functional.one_hot(zk, 3).double().requires_grad_(True)
        decoder.log_prob(x, decoder(decoder.embed(onehot))).sum().backward()
        grads.append(onehot.grad)
    torch.testing.assert_close(rhat, torch.stack(grads).mean(0))


def test_curvature_subtracts_the_squared_embedding_distance() -> None:
    """λ > 0: r^_l(c) = mean_k [linear estimate − (λ/2)‖e_c − h_kl‖²] up to a constant per token,
    checked against the table and embeddings read off the decoder; its maximiser over a code
    table is the code nearest to h + g/λ when K = 1 (a VQ step)."""
    torch.manual_seed(6)
    decoder = LinearRewardDecoder(IMAGE, LATENT).double()
    x = torch.rand(2, 1, 4, 4, dtype=F64)
    z = torch.randint(0, 3, (3, 2, 2))
    _, linear = _rewards(decoder, x, z)
    _, curved = _rewards(decoder, x, z, curvature=0.7)
    table = decoder.codebook.weight.detach()  # [V, d]
    h = table[z]  # [K, B, L, d]
    distance = ((table[None, None, None] - h.unsqueeze(-2)) ** 2).sum(-1).mean(0)  # [B, L, V]
    expected = linear - 0.35 * distance
    diff = curved - expected
    torch.testing.assert_close(diff - diff[..., :1], torch.zeros_like(diff), rtol=0, atol=1e-10)
    _, one = _rewards(decoder, x, z[:1], curvature=0.7)
    onehot = torch.nn.functional.one_hot(z[0], 3).double().requires_grad_(True)
    emb = decoder.embed(onehot)
    emb.retain_grad()
    decoder.log_prob(x, decoder(emb)).sum().backward()
    moved = h[0] + emb.grad / 0.7
    nearest = ((table[None, None] - moved.unsqueeze(-2)) ** 2).sum(-1).argmin(-1)
    assert torch.equal(one.argmax(-1), nearest)


def _closed_form(logq: torch.Tensor, r: torch.Tensor, eta: float, beta: float) -> torch.Tensor:
    return torch.log_softmax((eta * logq + r) / (eta + beta), dim=-1)


@pytest.mark.parametrize("beta", [0.0, 0.4])
def test_dense_proxy_meets_its_bound_with_the_closed_form(beta: float) -> None:
    g = torch.Generator().manual_seed(2)
    logq = torch.log_softmax(torch.randn(5, 4, 16, generator=g, dtype=F64), -1)
    r = 6.0 * torch.randn(5, 4, 16, generator=g, dtype=F64)
    log_target, eta, kl = dense_token_proxy(logq, r, bound=0.5, beta=beta)
    torch.testing.assert_close(log_target, _closed_form(logq, r, float(eta), beta))
    exact_kl = (log_target.exp() * (log_target - logq)).sum(-1).mean()
    assert float(kl) == pytest.approx(float(exact_kl), rel=1e-12)
    assert float(kl) <= 0.5 and float(kl) == pytest.approx(0.5, rel=1e-6)  # the bound binds, from below
    # a reward shift per column changes nothing (only differences between codes matter)
    shifted, eta2, _ = dense_token_proxy(logq, r + torch.randn(5, 4, 1, generator=g, dtype=F64) * 50, 0.5, beta)
    torch.testing.assert_close(shifted, log_target)
    assert float(eta2) == pytest.approx(float(eta), rel=1e-9)


def test_dense_proxy_maximises_the_regularised_reward() -> None:
    """q~ maximises E_q~[r] − β·KL(q~‖u) − η·KL(q~‖q) at its η: no random distribution beats it."""
    g = torch.Generator().manual_seed(3)
    logq = torch.log_softmax(torch.randn(8, generator=g, dtype=F64), -1)
    r = 3.0 * torch.randn(8, generator=g, dtype=F64)
    beta = 0.3
    log_target, eta, _ = dense_token_proxy(logq, r, bound=0.7, beta=beta)

    def objective(logp: torch.Tensor) -> torch.Tensor:
        p = logp.exp()
        return (p * r).sum() - beta * (p * (logp + math.log(8))).sum() - eta * (p * (logp - logq)).sum()

    best = objective(log_target)
    for _ in range(200):
        other = torch.log_softmax(log_target + 0.3 * torch.randn(8, generator=g, dtype=F64), -1)
        assert objective(other) <= best + 1e-12


def test_dense_proxy_of_an_additive_reward_is_the_enumerated_joint_proxy() -> None:
    """2 tokens x 3 codes: Π_l q~_l at the solved η equals the exact joint proxy of
    r = r_1 + r_2 under q = q_1 q_2, and the joint KL is L × the per-token mean it bounds."""
    g = torch.Generator().manual_seed(4)
    logq = torch.log_softmax(torch.randn(2, 3, generator=g, dtype=F64), -1)
    r = 4.0 * torch.randn(2, 3, generator=g, dtype=F64)
    log_target, eta, kl = dense_token_proxy(logq, r, bound=0.4, beta=0.2)
    states = torch.tensor(list(itertools.product(range(3), repeat=2)))
    joint_logq = logq[torch.arange(2), states].sum(-1)
    joint = _closed_form(joint_logq, r[torch.arange(2), states].sum(-1), float(eta), 0.2)
    torch.testing.assert_close(log_target[torch.arange(2), states].sum(-1), joint, rtol=1e-10, atol=1e-12)
    joint_kl = (joint.exp() * (joint - joint_logq)).sum()
    assert float(joint_kl) == pytest.approx(2 * float(kl), rel=1e-9)


def test_dense_proxy_not_binding_takes_the_largest_step() -> None:
    """With β > 0 the KL from q is capped; a bound above the cap gives η = 1e-3 (the largest)."""
    logq = torch.log_softmax(torch.tensor([[0.0, 0.1, -0.1]], dtype=F64), -1)
    _, eta, kl = dense_token_proxy(logq, torch.zeros(1, 3, dtype=F64), bound=5.0, beta=1.0)
    assert float(eta) == pytest.approx(math.exp(LOG_ETA_MIN))
    assert float(kl) < 5.0


def _method(**kw: object) -> Daps:
    torch.manual_seed(5)
    return DapsNA(encoder=ToyEncoder(IMAGE, LATENT), decoder=ToyDecoder(IMAGE, LATENT), beta=Constant(0.1),
                  samples=4, proxy=DapsProxy(), step_size=KlBoundEta(0.5), credit="first-order", **kw)


def test_method_loss_is_the_cross_entropy_to_the_dense_proxy() -> None:
    """policy_loss = − mean_b Σ_l Σ_c q~_l(c) log q_l(c), q~ from the same samples' gradients;
    gen_loss = − mean log p; the logged KL is the bound (it binds at these rewards)."""
    method = _method()
    x = torch.rand(5, 1, 4, 4)
    torch.manual_seed(9)
    out = method(x, step=1)
    torch.manual_seed(9)
    z, enc = method.encoder.sample_log_prob(x, method.samples)
    logp, rhat = first_order_rewards(method.decoder_log_prob, method.decoder, x, z, codes=3)
    logq = enc.logits[0]
    log_target, _, kl = dense_token_proxy(logq, rhat, 0.5, 0.1)
    expected = -(log_target.exp() * logq.detach().double()).sum((-1, -2)).mean()
    assert out.logs["policy_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert out.logs["gen_loss"] == pytest.approx(float(-logp.detach().mean()), rel=1e-6)
    assert out.logs["kl"] == pytest.approx(float(kl), rel=1e-6) and out.logs["kl"] <= 0.5 + 1e-9
    out.loss.backward()  # the encoder gets its gradient from the policy loss, the decoder from gen_loss
    assert method.encoder.head.weight.grad.abs().sum() > 0 and method.decoder.out.weight.grad.abs().sum() > 0
    # after_step still measures the encoder's real step (no optimiser step here: 0 nats)
    assert method.after_step(1) == {"encoder_kl": 0.0}


def test_first_order_credit_is_refused_where_it_cannot_run() -> None:
    with pytest.raises(ValueError, match='step_size\\] name = "kl"'):
        DapsNA(encoder=ToyEncoder(IMAGE, LATENT), decoder=ToyDecoder(IMAGE, LATENT), beta=Constant(0.1),
               step_size=FixedEta(1.0), credit="first-order")
    encoder = ToyEncoder(IMAGE, LATENT)
    encoder.autoregressive = True
    with pytest.raises(ValueError, match="needs a factorised encoder"):
        Daps(encoder=encoder, decoder=ToyDecoder(IMAGE, LATENT), beta=Constant(0.1), step_size=KlBoundEta(),
             credit="first-order")
