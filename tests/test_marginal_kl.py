"""The codes' marginal KL(q̄ ‖ uniform) (ngkit.methods.marginal_kl, DAPS's ``marginal_kl``):
its value and gradient against closed forms, the ELBO-surgery identity it rests on, and the
term the method adds to its loss."""

from __future__ import annotations

import math

import pytest
import torch
from test_daps_token_credit import PixelToyDecoder
from toy_models import ToyEncoder

from ngkit.components import ImageSpec, LatentSpec
from ngkit.methods import marginal_kl
from ngkit_plugins.beta_schedules import Constant
from ngkit_plugins.daps_method import DapsNA
from ngkit_plugins.daps_proxy import DapsProxy
from ngkit_plugins.step_size_policies import FixedEta

F64 = torch.float64


def test_extremes_uniform_marginal_and_one_code() -> None:
    codes = 8
    # every image sharp on its own code, the codes used equally often: marginal uniform, KL 0
    sharp = torch.full((codes, codes), -1e4, dtype=F64).fill_diagonal_(0.0)
    assert float(marginal_kl(torch.log_softmax(sharp, -1))) == pytest.approx(0.0, abs=1e-12)
    # every image on the same code: log C
    same = torch.full((5, 3, codes), -1e4, dtype=F64)
    same[..., 2] = 0.0
    assert float(marginal_kl(torch.log_softmax(same, -1))) == pytest.approx(math.log(codes), rel=1e-12)


def test_value_and_gradient_match_the_closed_form() -> None:
    """q̄ = mean_i softmax(a_i); KL = Σ_c q̄_c log(C q̄_c); ∂KL/∂a_ic = q_ic (log q̄_c − Σ_c' q_ic' log q̄_c') / N."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 4, 5, generator=g, dtype=F64, requires_grad=True)  # [K, B, L, C]
    kl = marginal_kl(torch.log_softmax(a, -1))
    q = torch.softmax(a.detach(), -1).reshape(-1, 5)
    qbar = q.mean(0)
    assert float(kl.detach()) == pytest.approx(float((qbar * (qbar * 5).log()).sum()), rel=1e-12)
    kl.backward()
    expected = q * (qbar.log() - (q * qbar.log()).sum(-1, keepdim=True)) / q.shape[0]
    torch.testing.assert_close(a.grad.reshape(-1, 5), expected, rtol=1e-10, atol=1e-14)


def test_the_prior_term_is_information_plus_marginal_kl() -> None:
    """ELBO surgery on an enumerable case: E_x KL(q(z|x) ‖ u) = I(x; z) + KL(q̄ ‖ u), where I is
    computed from the joint of a uniform x over 6 images and q(z|x) over 4 codes."""
    g = torch.Generator().manual_seed(1)
    logq = torch.log_softmax(3 * torch.randn(6, 4, generator=g, dtype=F64), -1)  # [images, codes]
    q = logq.exp()
    prior_term = (q * (logq + math.log(4))).sum(-1).mean()
    qbar = q.mean(0)
    information = (q * (logq - qbar.log())).sum(-1).mean()
    assert float(prior_term) == pytest.approx(float(information + marginal_kl(logq)), rel=1e-12)


def _method(weight: float, entropy_weight: float = 0.0) -> DapsNA:
    torch.manual_seed(0)
    image, latent = ImageSpec(1, 4, 4), LatentSpec((1, 2), 3)
    return DapsNA(encoder=ToyEncoder(image, latent), decoder=PixelToyDecoder(image, latent), beta=Constant(0.2),
                  samples=6, proxy=DapsProxy(), step_size=FixedEta(1.5), credit="token", marginal_kl=weight,
                  token_entropy=entropy_weight)


@pytest.mark.parametrize("weight", [0.3, 2.0])
def test_method_adds_weight_times_tokens_times_marginal_kl(weight: float) -> None:
    x = torch.rand(5, 1, 4, 4)
    outs = []
    for w in (0.0, weight):
        method = _method(w)
        torch.manual_seed(7)
        outs.append(method(x, step=1))
        torch.manual_seed(7)
        _, enc = method.encoder.sample_log_prob(x, method.samples)
    expected_kl = marginal_kl(enc.logits[:1].detach())
    assert float(outs[1].logs["marginal_kl"]) == pytest.approx(float(expected_kl), rel=1e-6)
    assert "marginal_kl" not in outs[0].logs
    # float32 losses of ~10^2 nats: compare the sums, to float32's resolution of them
    expected_loss = float(outs[0].loss.detach()) + weight * 2 * float(expected_kl)
    assert float(outs[1].loss.detach()) == pytest.approx(expected_loss, rel=2e-7)


def test_marginal_term_spreads_a_collapsed_encoder() -> None:
    """Gradient descent on the term alone moves a marginal stuck on one code toward uniform:
    the used codes' count rises (what the option is for), and KL falls."""
    a = torch.zeros(16, 4)
    a[:, 0] = 3.0
    a = (a + 0.1 * torch.randn(16, 4, generator=torch.Generator().manual_seed(2))).requires_grad_(True)
    first = float(marginal_kl(torch.log_softmax(a, -1)))
    for _ in range(200):
        kl = marginal_kl(torch.log_softmax(a, -1))
        (grad,) = torch.autograd.grad(kl, a)
        a = (a - 5.0 * grad).detach().requires_grad_(True)
    assert float(kl) < 0.05 * first
    assert len(set(a.argmax(-1).tolist())) == 4


def test_negative_weight_is_refused() -> None:
    with pytest.raises(ValueError, match="marginal_kl must be >= 0"):
        _method(-0.1)




def test_equal_weights_make_the_information_between_image_and_token() -> None:
    """marginal_kl = token_entropy = γ adds γ·L·(log C − I_batch(x; z_l)), with I_batch = H(q̄) −
    mean_i H(q_i) over the batch's per-token distributions (computed here from the logits)."""
    x = torch.rand(5, 1, 4, 4)
    gamma, tokens, codes = 0.7, 2, 3
    outs = []
    for w in (0.0, gamma):
        method = _method(w, w)
        torch.manual_seed(7)
        outs.append(method(x, step=1))
        torch.manual_seed(7)
        _, enc = method.encoder.sample_log_prob(x, method.samples)
    q = enc.logits[0].detach().double().exp().reshape(-1, codes)  # [B*L, C]
    qbar = q.mean(0)
    information = -(qbar * qbar.log()).sum() + (q * q.log()).sum(-1).mean()
    expected_loss = float(outs[0].loss.detach()) + gamma * tokens * (math.log(codes) - float(information))
    assert float(outs[1].loss.detach()) == pytest.approx(expected_loss, rel=2e-7)
    with pytest.raises(ValueError, match="token_entropy must be >= 0"):
        _method(0.0, -1.0)
