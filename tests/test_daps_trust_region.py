"""The encoder's real step: encoder_kl measured exactly (factorised) or without bias
(autoregressive), the MPO-style trust region that bounds it, and the default path left as it was."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from tiny_recipe import tiny
from toy_models import toy_pair

from ngkit.engine.artifacts import read_jsonl
from ngkit.engine.train_loop import train
from ngkit.recipe import parse_recipe
from ngkit_plugins.beta_schedules import Constant
from ngkit_plugins.daps_method import Daps
from ngkit_plugins.daps_proxy import DapsProxy
from ngkit_plugins.step_size_policies import KlBoundEta
from ngkit.methods.trust_region import ALPHA_MAX, EncoderTrustRegion, token_kl


def _method(seed: int = 0, **kw: float) -> Daps:
    torch.manual_seed(seed)
    encoder, decoder = toy_pair(tokens=2, codes=3)
    return Daps(encoder=encoder, decoder=decoder, beta=Constant(0.1), samples=8, proxy=DapsProxy(),
                step_size=KlBoundEta(), **kw)


def _images() -> torch.Tensor:
    x = torch.zeros(4, 1, 4, 4)
    for i in range(4):
        x[i].view(-1)[4 * i : 4 * i + 4] = 1.0
    return x


def _joint(logits: torch.Tensor) -> torch.Tensor:
    """All 3^2 sequences' log q for factorised logits [B, 2, 3] -> [B, 9]."""
    return torch.stack([logits[:, 0, a] + logits[:, 1, b] for a, b in itertools.product(range(3), repeat=2)], -1)


def test_token_kl_is_the_exact_kl_of_a_factorised_encoder() -> None:
    torch.manual_seed(0)
    old = torch.randn(1, 5, 2, 3).double().log_softmax(-1)
    new = torch.randn(1, 5, 2, 3).double().log_softmax(-1)
    lq_old, lq_new = _joint(old[0]), _joint(new[0])
    enumerated = (lq_old.exp() * (lq_old - lq_new)).sum(-1)
    torch.testing.assert_close(token_kl(old, new), enumerated, rtol=1e-12, atol=1e-12)


def test_token_kl_is_unbiased_along_samples_of_an_autoregressive_encoder() -> None:
    """q(z1) q(z2|z1) with a different table per z1: averaging the per-token KLs along sampled
    prefixes converges to the enumerated sequence KL."""
    torch.manual_seed(1)
    first_old, first_new = torch.randn(3).log_softmax(-1).double(), torch.randn(3).log_softmax(-1).double()
    second_old, second_new = torch.randn(3, 3).log_softmax(-1).double(), torch.randn(3, 3).log_softmax(-1).double()
    exact = sum(
        (first_old[a] + second_old[a, b]).exp() * (first_old[a] + second_old[a, b] - first_new[a] - second_new[a, b])
        for a, b in itertools.product(range(3), repeat=2)
    )
    k = 200_000
    z1 = torch.multinomial(first_old.exp(), k, replacement=True)
    old = torch.stack([first_old.expand(k, 3), second_old[z1]], 1).unsqueeze(1)  # [K, 1, L=2, V]
    new = torch.stack([first_new.expand(k, 3), second_new[z1]], 1).unsqueeze(1)
    per_sample = (old.exp() * (old - new)).sum(-1).sum(-1).squeeze(1)
    se = per_sample.std() / math.sqrt(k)
    assert abs(token_kl(old, new).item() - exact.item()) < 4 * se.item()


def test_encoder_kl_is_the_step_the_encoder_took() -> None:
    """after_step logs KL(q_before ‖ q_after) on the step's batch, checked by enumeration."""
    method = _method()
    x = _images()
    opt = torch.optim.Adam(method.parameters(), lr=0.05)
    before = method.encoder._logits(x).detach()
    out = method(x, step=1)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    after = method.encoder._logits(x).detach()
    lq_old, lq_new = _joint(before.double()), _joint(after.double())
    expected = (lq_old.exp() * (lq_old - lq_new)).sum(-1).mean().item()
    logs = method.after_step(1)
    assert expected > 1e-4  # the step did move the encoder
    assert logs["encoder_kl"] == pytest.approx(expected, rel=1e-6)


def test_default_path_unchanged_by_the_measurement() -> None:
    """With trust_region = 0 (the default) the measurement touches neither the parameters nor
    the random stream: training is bit-identical to training without it."""

    def run(measure: bool) -> list[torch.Tensor]:
        method = _method(seed=3)
        if not measure:
            method._measure_step = lambda: {}  # type: ignore[method-assign]
        opt = torch.optim.Adam(method.parameters(), lr=1e-2)
        for step in range(1, 16):
            out = method(_images(), step)
            assert out.logs["loss"] == pytest.approx(out.logs["policy_loss"] + out.logs["gen_loss"], rel=1e-6)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            method.after_step(step)
        return [p.detach().clone() for p in method.parameters()]

    for a, b in zip(run(True), run(False), strict=True):
        assert torch.equal(a, b)
    method = _method()
    assert method.trust is None and not any(k.startswith("trust") for k in method.state_dict())


def test_dual_variable_moves_the_right_way() -> None:
    trust = EncoderTrustRegion(bound=0.1, lr=0.5, init=1.0)
    trust.update(torch.tensor(0.4))  # stepped 4x too far: α rises
    assert trust.alpha == pytest.approx(math.exp(0.5 * math.log(4.0)))
    high = trust.alpha
    trust.update(torch.tensor(0.025))  # stayed well inside: α falls
    assert trust.alpha < high
    for _ in range(200):
        trust.update(torch.tensor(1e9))
    assert trust.alpha == pytest.approx(ALPHA_MAX)  # clamped, never inf
    with pytest.raises(ValueError, match="bound must be > 0"):
        EncoderTrustRegion(bound=0.0, lr=0.5, init=1.0)


def test_penalty_pulls_back_toward_the_encoder_before_the_last_step() -> None:
    """The second step's loss carries α·KL(q_prev ‖ q_θ) equal to the first step's encoder_kl,
    and a gradient step on that penalty alone shrinks it; α is checkpointed."""
    method = _method(trust_region=0.01, trust_region_lr=0.5)
    x = _images()
    opt = torch.optim.Adam(method.parameters(), lr=0.05)
    out = method(x, step=1)
    assert "tr_kl" not in out.logs  # no previous step to pull back toward
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    first = method.after_step(1)
    assert first["tr_alpha"] > 1.0  # the first Adam step moved q by more than 0.01 nats
    out = method(x, step=2)
    assert out.logs["tr_kl"] == pytest.approx(first["encoder_kl"], rel=1e-6)
    penalty = method._trust_region_penalty(method.trust)["tr_penalty"]
    method.zero_grad()
    penalty.backward()
    with torch.no_grad():
        for p in method.encoder.parameters():
            p -= 1e-2 * p.grad / method.trust.alpha
    assert method._trust_region_penalty(method.trust)["tr_kl"] < out.logs["tr_kl"]
    assert "trust.log_alpha" in method.state_dict()


def _encoder_kl(tmp_path, name: str, **method: float) -> list[float]:
    raw = tiny(
        method={"name": "daps-na", "samples": 4, "step_size": {"name": "kl", "bound": 1.0}, **method},
        optim={"lr": 3e-3},
        run={"steps": 60, "log_every": 1, "eval_every": 0, "checkpoint_every": 0},
    )
    train(parse_recipe(raw, "tiny"), tmp_path / name, quiet=True)
    return [r["encoder_kl"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if r.get("kind") == "train"]


def test_trust_region_bounds_the_real_step_on_a_tiny_run(tmp_path, one_thread: None) -> None:
    """With ε = 0.005 nats per image, every step after a 20-step warm-up (Adam's first steps,
    before α has risen) moves the encoder by at most 2ε; the same run without it does not."""
    bound = 0.005
    free = _encoder_kl(tmp_path, "free")
    bounded = _encoder_kl(tmp_path, "bounded", trust_region=bound, trust_region_lr=0.3)
    assert max(free[20:]) > 2 * bound
    assert max(bounded[20:]) <= 2 * bound, bounded[20:]
