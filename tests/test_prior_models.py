"""The two built-in priors as models: the flow's corruption and sampler, the AR sampler's cache,
guidance and masking (the issue's "tests that must hold" for the models)."""

from __future__ import annotations

import math

import pytest
import torch

from ngkit.components import LatentSpec
from ngkit.plugins import get_registry
from ngkit.priors.base import draw, filter_logits, guided
from ngkit_plugins.autoregressive_prior import AutoregressivePrior
from ngkit_plugins.discrete_flow_prior import DiscreteFlowPrior

LATENT = LatentSpec((2, 3), 16)  # 6 tokens of 16 codes


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _flow(**options) -> DiscreteFlowPrior:
    torch.manual_seed(0)
    return DiscreteFlowPrior(latent=LATENT, classes=10, width=32, depth=2, heads=4, **options)


def _ar(**options) -> AutoregressivePrior:
    torch.manual_seed(0)
    prior = AutoregressivePrior(latent=LATENT, classes=10, width=32, depth=2, heads=4, **options)
    with torch.no_grad():  # a sharper, less uniform model than at initialisation
        prior.head.weight.mul_(20)
    return prior.eval()


def test_registered() -> None:
    registry = get_registry()
    assert registry.get("priors", "discrete-flow").factory is DiscreteFlowPrior
    assert registry.get("priors", "autoregressive").factory is AutoregressivePrior


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_flow_corruption_keeps_each_token_with_probability_t(t: float) -> None:
    prior = _flow(source="mask")
    n, g = 4000, torch.Generator().manual_seed(1)
    z1 = torch.randint(16, (n, LATENT.tokens), generator=g)
    z_t = prior.corrupt(z1, torch.full((n,), t), generator=g)
    kept = z_t == z1
    assert ((z_t == prior.mask_token) | kept).all()  # a token is either kept or the mask
    sigma = math.sqrt(t * (1 - t) / kept.numel())
    assert abs(kept.float().mean().item() - t) < 4 * sigma
    # per position too: the coin is independent of where the token sits
    per_position = kept.float().mean(0)
    assert (per_position - t).abs().max().item() < 4 * math.sqrt(t * (1 - t) / n)


def test_flow_uniform_source_draws_only_allowed_codes_uniformly() -> None:
    prior = _flow(source="uniform")
    prior.allowed[12:] = False  # 12 codes the tokenizer can emit
    n, t, g = 20000, 0.3, torch.Generator().manual_seed(2)
    z1 = torch.zeros(n, LATENT.tokens, dtype=torch.long)
    z_t = prior.corrupt(z1, torch.full((n,), t), generator=g)
    assert z_t.max() < 12
    equal = (z_t == 0).float().mean().item()
    expected = t + (1 - t) / 12  # kept, or replaced by code 0 by chance
    assert abs(equal - expected) < 4 * math.sqrt(expected * (1 - expected) / z_t.numel())
    counts = torch.bincount(z_t[z_t != 0], minlength=12)[1:12].float()
    assert (counts / counts.mean() - 1).abs().max() < 0.1


class _Oracle(DiscreteFlowPrior):
    """A flow model that always predicts the data, whatever z_t, t and the label."""

    def __init__(self, data: torch.Tensor, **options) -> None:
        super().__init__(latent=LATENT, classes=10, width=8, depth=1, heads=2, **options)
        self.data = data

    def forward(self, z_t, t, labels):  # type: ignore[override]
        logits = torch.nn.functional.one_hot(self.data[: len(z_t)], LATENT.codes).float() * 50.0
        return self.mask_logits(logits).log_softmax(-1)


@pytest.mark.parametrize("source", ["uniform", "mask"])
@pytest.mark.parametrize("steps", [1, 5, 40])
def test_flow_sampler_turns_a_data_predicting_model_into_the_data(source: str, steps: int) -> None:
    data = torch.randint(16, (7, LATENT.tokens), generator=torch.Generator().manual_seed(3))
    oracle = _Oracle(torch.cat([data, data]), source=source, steps=steps)
    out = oracle.sample(torch.arange(7), guidance=2.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(out, data)


def test_flow_sampler_jumps_at_rate_dt_over_one_minus_t() -> None:
    """Before the last step a token changes with probability dt / (1 - t): check the first step."""
    data = torch.full((20000, LATENT.tokens), 5)
    oracle = _Oracle(torch.cat([data, data]), source="mask", steps=4)
    oracle.steps = 4
    calls = []
    original = oracle.predict

    def one_step(z, t, labels, guidance):
        calls.append(z.clone())
        return original(z, t, labels, guidance)

    oracle.predict = one_step  # type: ignore[method-assign]
    oracle.sample(torch.zeros(20000, dtype=torch.long), generator=torch.Generator().manual_seed(5))
    after_first = (calls[1] == 5).float().mean().item()
    assert abs(after_first - 0.25) < 0.01  # dt / (1 - 0) = 1/4
    after_second = (calls[2] == 5).float().mean().item()
    assert abs(after_second - 0.5) < 0.01  # 1/4 + 3/4 * (1/4) / (3/4)


def test_ar_cached_and_uncached_sampling_agree() -> None:
    prior = _ar()
    labels = torch.arange(10)
    cached = prior.sample(labels, guidance=1.5, generator=torch.Generator().manual_seed(6), cache=True)
    uncached = prior.sample(labels, guidance=1.5, generator=torch.Generator().manual_seed(6), cache=False)
    assert torch.equal(cached, uncached)
    # and the log-probabilities behind them: one pass over the sequence == token by token
    full = prior(labels, cached[:, :-1])
    caches = [{} for _ in prior.blocks]
    steps = [prior(labels, cached[:, :i], caches)[:, -1] for i in range(LATENT.tokens)]
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-4, atol=1e-5)


def test_ar_guidance_one_equals_the_conditional_model() -> None:
    prior = _ar(temperature=0.8, top_k=8)
    labels = torch.tensor([0, 3, 3, 9, 1])
    guided_codes = prior.sample(labels, guidance=1.0, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    codes = torch.zeros(5, 0, dtype=torch.long)
    for _ in range(LATENT.tokens):  # the conditional model alone, no null-label rows at all
        logp = prior(labels, codes)[:, -1]
        codes = torch.cat([codes, draw(filter_logits(logp, 0.8, 8), g)[:, None]], 1)
    assert torch.equal(guided_codes, codes)
    # the formula itself returns the conditional values bit for bit at scale 1
    c, u = torch.randn(100), torch.randn(100)
    assert torch.equal(guided(c, u, 1.0), c)
    assert torch.equal(guided(c, u, 0.0), u)


def test_ar_guidance_changes_samples() -> None:
    prior = _ar()
    labels = torch.arange(10).repeat(5)
    a = prior.sample(labels, guidance=1.0, generator=torch.Generator().manual_seed(8))
    b = prior.sample(labels, guidance=4.0, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("make", [_ar, _flow])
def test_masked_codes_are_never_sampled(make) -> None:
    prior = make()
    with torch.no_grad():
        prior.head.bias[8:] = 30.0  # the model prefers exactly the codes the tokenizer cannot emit
    prior.allowed[8:] = False
    labels = torch.arange(10).repeat(20)
    for guidance in (0.0, 1.0, 3.0):
        out = prior.sample(labels, guidance=guidance, generator=torch.Generator().manual_seed(9))
        assert out.shape == (200, LATENT.tokens)
        assert out.max() < 8


def test_filter_logits_top_k_and_top_p() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [False, False, False, True]
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(logits, temperature=0)


def test_losses_fall_on_a_learnable_set() -> None:
    """Both priors fit four fixed sequences, one per label, in a few hundred steps."""
    data = torch.randint(16, (4, LATENT.tokens), generator=torch.Generator().manual_seed(10))
    for prior in (_flow(label_dropout=0.0), _ar(label_dropout=0.0).train()):
        opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
        first = None
        for _ in range(300):
            out = prior.loss(data, torch.arange(4))
            first = first if first is not None else out.logs["loss"]
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        assert out.logs["loss"] < 0.25 * first
        prior.eval()
        samples = prior.sample(torch.arange(4), generator=torch.Generator().manual_seed(11))
        assert (samples == data).float().mean() > 0.9
