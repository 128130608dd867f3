"""The DAPS method on the toy encoder/decoder: losses, gradients, η adaptation, training."""

from __future__ import annotations

import math

import pytest
import torch
from toy_models import toy_pair

from ngkit.plugins import get_registry
from ngkit_plugins.beta_schedules import Constant, Exponential
from ngkit_plugins.daps_method import Daps, DapsNA
from ngkit_plugins.daps_proxy import DapsProxy
from ngkit_plugins.step_size_policies import FixedEta, KlBoundEta, LearnedEssEta

LOG_KEYS = {
    *("loss", "policy_loss", "gen_loss", "eta", "beta", "ess", "kl", "logp", "logq", "entropy"),
    *("advantage_mean", "advantage_std", "weight_max"),
}


def _method(cls: type[Daps] = Daps, step_size: torch.nn.Module | None = None, seed: int = 0, **kw) -> Daps:
    torch.manual_seed(seed)
    encoder, decoder = toy_pair(**kw)
    return cls(
        encoder=encoder,
        decoder=decoder,
        beta=Constant(0.1),
        samples=8,
        proxy=DapsProxy(),
        step_size=step_size if step_size is not None else LearnedEssEta(),
    )


def _images(n: int = 4, size: int = 4) -> torch.Tensor:
    """n distinct binary images: image i lights pixel block i."""
    x = torch.zeros(n, 1, size, size)
    for i in range(n):
        x[i].view(-1)[i * size * size // n : (i + 1) * size * size // n] = 1.0
    return x


def test_registered() -> None:
    reg = get_registry()
    assert reg.get("methods", "daps").factory is Daps
    assert reg.get("methods", "daps-na").factory is DapsNA


def test_forward_loss_and_logs() -> None:
    method = _method()
    out = method(_images(), step=1)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.logs) == LOG_KEYS
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.logs.values())
    assert out.logs["loss"] == pytest.approx(out.logs["policy_loss"] + out.logs["gen_loss"], rel=1e-6)
    assert out.logs["eta"] == pytest.approx(100.0) and out.logs["beta"] == pytest.approx(0.1)
    assert 1 / 8 <= out.logs["ess"] <= 1.0 and 0 <= out.logs["kl"] <= math.log(8)
    assert out.logs["entropy"] <= math.log(3)  # nats per token, 3 codes


def test_gradients_reach_encoder_and_decoder() -> None:
    method = _method(step_size=FixedEta(1.0))
    method(_images(), step=1).loss.backward()
    for name, p in method.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_policy_gradient_uses_detached_weights() -> None:
    """The encoder's gradient is exactly that of −mean_b Σ_k w·logq with w held fixed."""
    method = _method(step_size=FixedEta(0.5))
    x = _images()
    torch.manual_seed(123)
    method(x, step=1).loss.backward()
    got = [p.grad.clone() for p in method.encoder.parameters()]

    torch.manual_seed(123)  # the same codes z
    z, _ = method.encoder.sample(x, 8)
    logq = method.encoder.log_prob(x, z).logq
    with torch.no_grad():
        logp, _ = method.decoder_log_prob(x, z)
    w = DapsProxy()(logp, logq.detach(), 0.5, 0.1).weights.float()
    params = list(method.encoder.parameters())
    expected = torch.autograd.grad(-(w * logq).sum(0).mean(), params, retain_graph=True)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    # Not the gradient of a loss whose weights depend on logq: then the estimator would differ.
    coupled = torch.softmax((logp - 0.1 * logq) / 0.6, dim=0)
    other = torch.autograd.grad(-(coupled * logq).sum(0).mean(), params)
    assert any((g - o).abs().max() > 1e-4 for g, o in zip(got, other, strict=True))


def test_after_step_adapts_eta_and_state_is_checkpointed() -> None:
    method = _method()
    assert method.after_step(0) == {}  # no step taken yet
    method(_images(), step=1)
    logs = method.after_step(1)
    assert "eta_loss" in logs and method.step_size.log_eta.item() != pytest.approx(math.log(100.0), abs=1e-6)
    assert method.after_step(1) == {}  # one update per taken step
    state = method.state_dict()
    assert {"step_size.log_eta", "step_size.exp_avg", "step_size.exp_avg_sq", "step_size.steps"} <= set(state)
    assert not any(name.startswith("step_size.") for name, _ in method.named_parameters())


def test_daps_na_rejects_an_autoregressive_encoder() -> None:
    encoder, decoder = toy_pair()
    encoder.autoregressive = True
    kwargs = dict(encoder=encoder, decoder=decoder, beta=Constant(0.1), proxy=DapsProxy(), step_size=FixedEta())
    with pytest.raises(ValueError, match=r"\[model.encoder\] factorised = true"):
        DapsNA(**kwargs)
    Daps(**kwargs)  # plain DAPS takes either kind
    encoder.autoregressive = False
    DapsNA(**kwargs)


def test_samples_must_allow_a_comparison() -> None:
    encoder, decoder = toy_pair()
    with pytest.raises(ValueError, match="samples"):
        Daps(encoder=encoder, decoder=decoder, beta=Constant(0.1), samples=1, proxy=DapsProxy(), step_size=FixedEta())


@pytest.mark.parametrize("step_size", ["kl", "ess"])
def test_training_improves_reconstruction(step_size: str, one_thread: None) -> None:
    """A few hundred steps on 4 images: logp rises, and the encoder's greedy codes reconstruct
    better than any single shared code could (the dataset mean), so the encoder learned. The
    learned-η policy gets lr 0.05: at the paper's 1e-3, η barely leaves 100 in 300 steps."""
    steps = 300
    policy = KlBoundEta(bound=1.0) if step_size == "kl" else LearnedEssEta(lr=0.05)
    method = _method(step_size=policy, seed=1, tokens=2, codes=4)
    method.beta = Exponential(start=0.5, end=0.01, total_steps=steps)
    x = _images()
    opt = torch.optim.Adam(method.parameters(), lr=1e-2)
    logp = []
    for step in range(1, steps + 1):
        out = method(x, step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        method.after_step(step)
        logp.append(out.logs["logp"])
    assert sum(logp[-20:]) / 20 > sum(logp[:20]) / 20 + 1.0
    recon = method.decode(method.encode(x))
    mse = (recon - x).pow(2).mean().item()
    shared_code_mse = (x - x.mean(0)).pow(2).mean().item()  # best any input-independent code can do
    assert mse < 0.5 * shared_code_mse, (mse, shared_code_mse)
    assert len(set(map(tuple, method.encode(x).tolist()))) == len(x)  # every image has its own code
