"""β schedules: exact endpoints, shapes, monotonicity, constant after ``steps``; β relative to the
reward spread."""

from __future__ import annotations

import math

import pytest
import torch
from toy_models import toy_pair

from ngkit.plugins import get_registry
from ngkit.methods import reward_scale
from ngkit_plugins.beta_schedules import Constant, Cosine, Exponential, Linear
from ngkit_plugins.daps_method import DapsNA
from ngkit_plugins.daps_proxy import DapsProxy, proxy_weights
from ngkit_plugins.step_size_policies import FixedEta

SHAPED = {"linear": Linear, "exponential": Exponential, "cosine": Cosine}


def test_registered() -> None:
    reg = get_registry()
    assert reg.get("beta_schedules", "constant").factory is Constant
    for name, cls in SHAPED.items():
        assert reg.get("beta_schedules", name).factory is cls


def test_constant() -> None:
    assert [Constant(0.3)(s) for s in (0, 1, 10**6)] == [0.3, 0.3, 0.3]
    assert Constant()(5) == 1.0
    with pytest.raises(ValueError, match="value"):
        Constant(-1.0)


@pytest.mark.parametrize("name", list(SHAPED))
@pytest.mark.parametrize("start,end", [(50.0, 1.0), (6.0, 0.01), (0.01, 0.5)])
def test_endpoints_monotone_and_constant_after(name: str, start: float, end: float) -> None:
    schedule = SHAPED[name](start=start, end=end, steps=200, total_steps=10_000)
    assert schedule(0) == start and schedule(200) == end
    assert schedule(201) == end and schedule(10_000) == end
    values = [schedule(s) for s in range(0, 201)]
    pairs = list(zip(values, values[1:]))
    if start > end:
        assert all(a > b for a, b in pairs)
    else:
        assert all(a < b for a, b in pairs)


@pytest.mark.parametrize("name", list(SHAPED))
def test_steps_default_to_total_steps(name: str) -> None:
    schedule = SHAPED[name](start=4.0, end=0.5, total_steps=1000)
    assert schedule(999) != 0.5 and schedule(1000) == 0.5
    half = SHAPED[name](start=4.0, end=0.5, steps=500, total_steps=1000)
    assert half(500) == 0.5


def test_exponential_is_geometric() -> None:
    """Linear in log β: a constant ratio (end/start)^(1/steps) between consecutive steps, as the
    reference's auto_exp_decay (ImageNet 50 → 1)."""
    schedule = Exponential(start=50.0, end=1.0, steps=300, total_steps=300)
    ratio = (1.0 / 50.0) ** (1 / 300)
    for s in range(300):
        assert schedule(s + 1) / schedule(s) == pytest.approx(ratio, rel=1e-12)
    assert schedule(150) == pytest.approx(math.sqrt(50.0 * 1.0), rel=1e-12)  # geometric mean at mid-run


def test_linear_and_cosine_midpoints() -> None:
    assert Linear(start=6.0, end=2.0, steps=10, total_steps=10)(5) == pytest.approx(4.0)
    cosine = Cosine(start=6.0, end=2.0, steps=10, total_steps=10)
    assert cosine(5) == pytest.approx(4.0)
    assert cosine(1) - cosine(0) > -0.1 > cosine(5) - cosine(4)  # flat at the ends, steep mid-run


def test_invalid_options() -> None:
    with pytest.raises(ValueError, match="> 0"):
        Exponential(start=1.0, end=0.0, total_steps=10)
    with pytest.raises(ValueError, match="steps"):
        Linear(start=1.0, end=0.0, steps=0, total_steps=10)
    with pytest.raises(ValueError, match=">= 0"):
        Cosine(start=-1.0, end=0.0, total_steps=10)


def test_relative_beta_is_in_units_of_the_reward_spread() -> None:
    """relative = "advantage_spread": β·(mean over images of std_k log p), so rewards scaled by
    c (c× more pixels, or a sharper decoder) give c× the β and the same proxy weights."""
    torch.manual_seed(0)
    logp = torch.randn(8, 5, dtype=torch.float64) * 30 - 2000
    schedule = Exponential(start=2.0, end=0.5, relative="advantage_spread", total_steps=10)
    spread = logp.std(dim=0).mean().item()
    assert reward_scale(schedule, logp) == pytest.approx(spread)
    assert reward_scale(schedule, 10 * logp) == pytest.approx(10 * spread)
    assert reward_scale(Exponential(start=2.0, end=0.5, total_steps=10), logp) == 1.0  # the paper's: nats
    assert reward_scale(Constant(1.0, relative="advantage_spread"), logp.new_full((8, 5), -3.0)) == 1e-6
    logq = torch.randn(8, 5, dtype=torch.float64) - 20
    w = [
        proxy_weights(c * logp, logq, eta=c * 1.0, beta=schedule(3) * reward_scale(schedule, c * logp)).weights
        for c in (1.0, 10.0)
    ]
    torch.testing.assert_close(w[0], w[1])  # invariant with η in the same units
    with pytest.raises(ValueError, match="relative must be one of none, advantage_spread"):
        Linear(start=1.0, end=0.0, relative="pixels", total_steps=10)


def test_daps_logs_the_scaled_beta() -> None:
    torch.manual_seed(0)
    encoder, decoder = toy_pair()
    method = DapsNA(encoder=encoder, decoder=decoder, beta=Constant(0.5, relative="advantage_spread"),
                    samples=8, proxy=DapsProxy(), step_size=FixedEta(10.0))
    out = method(torch.rand(4, 1, 4, 4), step=1)
    spread = method._last[0].double().std(dim=0).mean().item()
    assert out.logs["beta_schedule"] == 0.5 and out.logs["beta"] == pytest.approx(0.5 * spread)
