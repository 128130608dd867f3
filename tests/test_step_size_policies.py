"""Step-size policies for η: fixed, per-batch KL bound, learned ESS target (incl. two ranks)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ngkit.plugins import get_registry
from ngkit_plugins.daps_proxy import proxy_weights
from ngkit_plugins.step_size_policies import ETA_MAX, ETA_MIN, FixedEta, KlBoundEta, LearnedEssEta

F64 = torch.float64


def _batch(spread: float, k: int = 8, b: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logp = (-1000.0 + spread * torch.randn(k, b, generator=g)).float()
    logq = (-20.0 + 2.0 * torch.randn(k, b, generator=g)).float()
    return logp, logq


def test_registered() -> None:
    reg = get_registry()
    assert reg.get("step_size_policies", "ess").factory is LearnedEssEta
    assert reg.get("step_size_policies", "fixed").factory is FixedEta
    assert reg.get("step_size_policies", "kl").factory is KlBoundEta


def test_fixed() -> None:
    logp, logq = _batch(5.0)
    policy = FixedEta(eta=3.5)
    eta = policy.eta(logp, logq, 0.1)
    assert eta.dtype == F64 and eta.ndim == 0 and eta.item() == 3.5
    assert policy.update(logp, logq, 0.1) == {}
    assert FixedEta().eta(logp, logq, 0.0).item() == 100.0
    with pytest.raises(ValueError, match="eta"):
        FixedEta(eta=0.0)


@pytest.mark.parametrize("bound", [0.05, 0.3, 1.0, 1.8])
@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_kl_policy_meets_the_bound(bound: float, beta: float) -> None:
    logp, logq = _batch(10.0)
    policy = KlBoundEta(bound=bound)
    eta = policy.eta(logp, logq, beta)
    assert not eta.requires_grad and eta.ndim == 0
    kl = proxy_weights(logp, logq, eta, beta).kl.item()
    assert kl <= bound
    assert kl == pytest.approx(bound, rel=1e-3)
    # The bracket is tight: a slightly smaller η (a bigger step) breaks the bound.
    assert proxy_weights(logp, logq, eta * math.exp(-2 * policy.TOL_LOG_ETA), beta).kl.item() > bound


def test_kl_policy_not_binding_returns_smallest_eta() -> None:
    """The K-sample KL is at most log K: a bound above it never binds, η = ETA_MIN."""
    logp, logq = _batch(10.0)
    eta = KlBoundEta(bound=math.log(8) + 0.1).eta(logp, logq, 0.0)
    assert eta.item() == pytest.approx(ETA_MIN, rel=1e-12)


def test_kl_policy_unreachable_bound_returns_largest_eta() -> None:
    """A reward spread of ~1e7 nats exceeds a tiny bound even at ETA_MAX: η = ETA_MAX, KL > bound."""
    logp, logq = _batch(1e7)
    policy = KlBoundEta(bound=1e-6)
    eta = policy.eta(logp.double(), logq.double(), 0.0)
    assert eta.item() == pytest.approx(ETA_MAX, rel=1e-12)
    assert proxy_weights(logp, logq, eta, 0.0).kl.item() > 1e-6


def test_kl_policy_default_and_validation() -> None:
    assert KlBoundEta().bound == 1.0
    with pytest.raises(ValueError, match="bound"):
        KlBoundEta(bound=0.0)


def _ess_gradient(policy: LearnedEssEta, logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    log_eta = policy.log_eta.clone().requires_grad_(True)
    ess = proxy_weights(logp, logq, log_eta.exp(), beta).ess
    (grad,) = torch.autograd.grad((ess - policy.target * logp.shape[0]) ** 2, log_eta)
    return grad


def test_ess_policy_defaults_and_buffers() -> None:
    policy = LearnedEssEta()
    assert policy.eta(*_batch(1.0), 0.0).item() == pytest.approx(100.0)
    assert policy.target == 0.25 and policy.lr == 1e-3
    assert list(policy.parameters()) == []
    assert set(policy.state_dict()) == {"log_eta", "exp_avg", "exp_avg_sq", "steps"}
    with pytest.raises(ValueError, match="target"):
        LearnedEssEta(target=1.5)


def test_ess_above_target_shrinks_eta() -> None:
    logp, logq = _batch(0.1)  # nearly equal rewards: at η = 100 the weights are ~uniform, ESS ≈ K
    policy = LearnedEssEta()
    assert proxy_weights(logp, logq, policy.eta(logp, logq, 0.0), 0.0).ess.item() > 0.25 * 8
    before = policy.log_eta.item()
    logs = policy.update(logp, logq, 0.0)
    assert policy.log_eta.item() < before
    assert before - policy.log_eta.item() == pytest.approx(1e-3, rel=1e-4)  # Adam's first step is lr
    assert logs["eta_loss"] > 0


def test_ess_below_target_grows_eta() -> None:
    logp, logq = _batch(1e4)  # huge reward gaps: one-hot weights at η = 100, ESS ≈ 1
    policy = LearnedEssEta()
    assert proxy_weights(logp, logq, policy.eta(logp, logq, 0.0), 0.0).ess.item() < 0.25 * 8
    before = policy.log_eta.item()
    policy.update(logp, logq, 0.0)
    assert policy.log_eta.item() > before


def test_ess_policy_matches_torch_adam() -> None:
    """The hand-written Adam on log η follows torch.optim.Adam on the same loss."""
    policy = LearnedEssEta(target=0.3, lr=0.05, init=2.0)
    ref = torch.nn.Parameter(torch.tensor(math.log(2.0), dtype=F64))
    opt = torch.optim.Adam([ref], lr=0.05, betas=LearnedEssEta.BETAS, eps=LearnedEssEta.EPS)
    for i in range(6):
        logp, logq = _batch(3.0 + i, seed=i)
        beta = 0.1 * i
        opt.zero_grad()
        ess = proxy_weights(logp, logq, ref.exp(), beta).ess
        ((ess - 0.3 * 8) ** 2).backward()
        opt.step()
        policy.update(logp, logq, beta)
        assert policy.log_eta.item() == pytest.approx(ref.item(), abs=1e-12)
    assert abs(ref.item() - math.log(2.0)) > 0.1  # it moved


def test_ess_policy_state_round_trip() -> None:
    policy = LearnedEssEta(lr=0.01)
    for i in range(3):
        policy.update(*_batch(50.0, seed=i), 0.5)
    restored = LearnedEssEta(lr=0.01)
    restored.load_state_dict(policy.state_dict())
    for name, value in policy.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    assert restored.steps.item() == 3
    batch = _batch(50.0, seed=9)
    policy.update(*batch, 0.5)
    restored.update(*batch, 0.5)
    assert restored.log_eta.item() == policy.log_eta.item()


def test_ess_policy_state_stays_float64_under_half_precision_casts() -> None:
    policy = LearnedEssEta()
    policy.update(*_batch(50.0), 0.0)
    expected = policy.log_eta.item()
    policy.bfloat16()
    policy.to(torch.float16)
    assert policy.log_eta.dtype == F64 and policy.log_eta.item() == expected
    assert policy.steps.dtype == torch.int64


def _two_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        policy = LearnedEssEta(lr=0.01)
        for i in range(4):
            policy.update(*_batch(20.0 * (1 + rank), seed=10 * rank + i), 0.0)  # different data per rank
        torch.save(policy.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ess_policy_keeps_eta_identical_across_ranks(tmp_path: Path) -> None:
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name

    # ... and equal to one process stepping on the rank-averaged gradient.
    ref = LearnedEssEta(lr=0.01)
    for i in range(4):
        grads = [_ess_gradient(ref, *_batch(20.0 * (1 + r), seed=10 * r + i), 0.0) for r in range(2)]
        ref._adam_step((grads[0] + grads[1]) / 2)
    assert states[0]["log_eta"].item() == pytest.approx(ref.log_eta.item(), abs=1e-12)
    solo = LearnedEssEta(lr=0.01)
    for i in range(4):
        solo.update(*_batch(20.0, seed=i), 0.0)
    assert solo.log_eta.item() != pytest.approx(ref.log_eta.item(), abs=1e-6)  # averaging mattered
