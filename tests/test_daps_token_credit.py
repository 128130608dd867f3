"""Per-token credit for factorised encoders (docs/daps.md, "Per-token credit"): the factorised
proxy is exact for an additive reward, each token's weights reproduce its own proxy, the patch
rewards add up to log p(x|z), and the method's loss is the per-token weighted likelihood."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from toy_models import ToyDecoder, ToyEncoder, toy_pair

from ngkit.components import ImageSpec, LatentSpec
from ngkit_plugins.beta_schedules import Constant
from ngkit_plugins.daps_method import Daps, DapsNA
from ngkit_plugins.daps_proxy import DapsProxy, patch_rewards, proxy_weights
from ngkit_plugins.step_size_policies import FixedEta, KlBoundEta

F64 = torch.float64
TOKENS, CODES = 2, 3
STATES = torch.tensor(list(itertools.product(range(CODES), repeat=TOKENS)))  # [9, 2]


def _q_and_reward(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log q [L, V] of a factorised q and per-token rewards r_l(z_l) [L, V]."""
    g = torch.Generator().manual_seed(seed)
    token_logq = torch.log_softmax(torch.randn(TOKENS, CODES, generator=g, dtype=F64), dim=-1)
    return token_logq, 4.0 * torch.randn(TOKENS, CODES, generator=g, dtype=F64)


def _proxy(logq: torch.Tensor, r: torch.Tensor, eta: float, beta: float) -> torch.Tensor:
    """q~ ∝ q^(η/(η+β)) exp(r/(η+β)), normalised over the last axis (docs/daps.md step 5)."""
    return torch.softmax(eta / (eta + beta) * logq + r / (eta + beta), dim=-1)


@pytest.mark.parametrize("eta,beta", [(1.0, 0.0), (0.7, 0.3), (10.0, 2.0)])
def test_additive_reward_gives_the_product_of_token_proxies(eta: float, beta: float) -> None:
    """Enumerating all 9 sequences: the exact proxy of r = r_1(z_1) + r_2(z_2) under a
    factorised q equals Π_l q~_l(z_l) with q~_l ∝ q_l^(η/(η+β)) exp(r_l/(η+β))."""
    token_logq, r = _q_and_reward(0)
    joint_logq = token_logq[torch.arange(TOKENS), STATES].sum(-1)
    joint_r = r[torch.arange(TOKENS), STATES].sum(-1)
    exact = _proxy(joint_logq, joint_r, eta, beta)
    per_token = _proxy(token_logq, r, eta, beta)  # [L, V]
    product = per_token[torch.arange(TOKENS), STATES].prod(-1)
    torch.testing.assert_close(product, exact, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("eta,beta", [(1.0, 0.0), (0.7, 0.3), (10.0, 2.0)])
def test_token_columns_give_each_token_proxy(eta: float, beta: float) -> None:
    """The proxy's weights on one column per token (all V codes passed once, as the per-token
    credit lays them out, ``[K, B*L]``) imply q~_l = w·q_l / Σ w·q_l, the token's exact proxy."""
    token_logq, r = _q_and_reward(1)
    w = proxy_weights(r.T, token_logq.T, eta, beta).weights  # [V, L]: K = V codes, one column per token
    implied = (w * token_logq.T.exp()) / (w * token_logq.T.exp()).sum(0)
    torch.testing.assert_close(implied.T, _proxy(token_logq, r, eta, beta), rtol=1e-12, atol=1e-15)


def test_patch_rewards_cover_each_token_patch_on_a_non_square_grid() -> None:
    """A 2 x 4 token grid on 4 x 8 images (2 x 2 patches): each pixel counts for the token whose
    patch holds it, row-major, and the token rewards add up to the image's log-likelihood."""
    pixels = torch.randn(3, 2, 4, 8, dtype=F64)
    tokens = patch_rewards(pixels, (2, 4))
    assert tokens.shape == (3, 8)
    torch.testing.assert_close(tokens.sum(-1), pixels.flatten(1).sum(-1))
    one = torch.zeros(1, 1, 4, 8, dtype=F64)
    one[0, 0, 3, 5] = 1.0  # row 3 -> token row 1; column 5 -> token column 2
    assert patch_rewards(one, (2, 4))[0].nonzero().flatten().tolist() == [1 * 4 + 2]


class PixelToyDecoder(ToyDecoder):
    """The toy decoder with its per-pixel log-likelihood (unit-variance Gaussian)."""

    def pixel_log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return -0.5 * (x - params) ** 2 - 0.5 * math.log(2 * math.pi)

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return self.pixel_log_prob(x, params).flatten(1).sum(-1)


def _method(tokens: int, credit: str, seed: int = 0) -> Daps:
    torch.manual_seed(seed)
    image, latent = ImageSpec(1, 4, 4), LatentSpec((1, tokens), CODES)
    return DapsNA(encoder=ToyEncoder(image, latent), decoder=PixelToyDecoder(image, latent), beta=Constant(0.2),
                  samples=6, proxy=DapsProxy(), step_size=FixedEta(1.5), credit=credit)


def test_method_loss_is_the_per_token_weighted_likelihood() -> None:
    """Token credit: policy_loss = − mean_b Σ_l Σ_k w_l[k,b] log q_l(z_k,l|x_b), w_l from the
    rewards of token l's own patch (recomputed here from the same samples)."""
    method = _method(tokens=2, credit="token")
    x = torch.rand(5, 1, 4, 4)
    torch.manual_seed(7)
    out = method(x, step=1)
    torch.manual_seed(7)
    z, enc = method.encoder.sample_log_prob(x, method.samples)
    k, b = z.shape[:2]
    params = method.decoder(method.decoder.embed(z.flatten(0, 1)))
    pixels = method.decoder.pixel_log_prob(x.repeat(k, 1, 1, 1), params).view(k, b, 1, 4, 4)
    r = torch.stack([pixels[..., :, :2].sum((-3, -2, -1)), pixels[..., :, 2:].sum((-3, -2, -1))], -1)  # [K, B, 2]
    logq = enc.logits.gather(-1, z.unsqueeze(-1)).squeeze(-1)  # [K, B, 2]
    expected = 0.0
    for l in range(2):
        w = proxy_weights(r[..., l], logq[..., l], 1.5, 0.2).weights
        expected = expected - (w * logq[..., l].double()).sum(0).mean()
    assert out.logs["policy_loss"] == pytest.approx(float(expected.detach()), rel=1e-6)
    assert out.logs["gen_loss"] == pytest.approx(float(-r.detach().sum(-1).mean()), rel=1e-6)


def test_one_token_credit_is_sequence_credit() -> None:
    """With L = 1 the token's patch is the whole image: the same loss and the same gradients."""
    x = torch.rand(4, 1, 4, 4)
    grads = []
    for credit in ("sequence", "token"):
        method = _method(tokens=1, credit=credit, seed=3)
        torch.manual_seed(11)
        out = method(x, step=1)
        out.loss.backward()
        grads.append([p.grad.clone() for p in method.parameters()])
        assert out.logs["policy_loss"] != 0.0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_token_credit_needs_a_factorised_encoder_and_pixel_likelihoods() -> None:
    encoder, decoder = toy_pair()
    encoder.autoregressive = True
    with pytest.raises(ValueError, match="needs a factorised encoder"):
        Daps(encoder=encoder, decoder=decoder, beta=Constant(0.1), step_size=KlBoundEta(), credit="token")
    encoder, decoder = toy_pair()
    with pytest.raises(ValueError, match="no pixel_log_prob"):
        Daps(encoder=encoder, decoder=decoder, beta=Constant(0.1), step_size=KlBoundEta(), credit="token")
    with pytest.raises(ValueError, match='credit must be "sequence", "token" or "first-order"'):
        Daps(encoder=encoder, decoder=decoder, beta=Constant(0.1), step_size=KlBoundEta(), credit="patch")
