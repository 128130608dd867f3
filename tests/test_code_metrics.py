"""Code usage, perplexity, bits per image and the β-ELBO on hand-made codes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ngkit.components import EvalBatch, LatentSpec
from ngkit.errors import NgkitError
from ngkit.plugins import get_registry
from ngkit_plugins.code_metrics import BetaElboMetric, CodeUsageMetric

LATENT = LatentSpec(grid=(2, 2), codes=8)  # L = 4 tokens, V = 8 codes


def batch(
    codes: list[list[int]], beta_elbo: list[float] | None = None, shape: tuple[int, int, int] = (1, 4, 4)
) -> EvalBatch:
    b = len(codes)
    images = torch.zeros(b, *shape)
    elbo = None if beta_elbo is None else torch.tensor(beta_elbo, dtype=torch.float64)
    return EvalBatch(images, images.clone(), torch.tensor(codes), LATENT, elbo)


def test_metrics_are_registered() -> None:
    registry = get_registry()
    assert registry.get("metrics", "usage").factory is CodeUsageMetric
    assert registry.get("metrics", "beta-elbo").factory is BetaElboMetric


def test_usage_perplexity_and_dead_codes_of_hand_made_codes() -> None:
    metric = CodeUsageMetric()
    metric.update(batch([[0, 0, 1, 1], [2, 2, 3, 3]]))
    metric.update(batch([[0, 1, 2, 3]]))
    # 12 tokens: codes 0..3 three times each, codes 4..7 never.
    result = metric.compute()
    assert result["code_usage"] == 4 / 8
    assert result["dead_codes"] == 4
    assert result["code_perplexity"] == pytest.approx(4.0)  # uniform over 4 used codes
    assert result["bits_per_image"] == pytest.approx(4 * math.log2(8)) == 12
    assert metric.protocol()["tokens"] == 12


def test_perplexity_of_a_skewed_histogram() -> None:
    metric = CodeUsageMetric()
    metric.update(batch([[5, 5, 5, 7]]))  # p = (3/4, 1/4)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert metric.compute()["code_perplexity"] == pytest.approx(math.exp(entropy))


def test_perplexity_is_v_when_every_code_is_equally_used() -> None:
    metric = CodeUsageMetric()
    metric.update(batch([[0, 1, 2, 3], [4, 5, 6, 7]]))
    result = metric.compute()
    assert result["code_perplexity"] == pytest.approx(8.0)
    assert result["code_usage"] == 1.0 and result["dead_codes"] == 0


def test_codes_outside_the_vocabulary_or_grid_are_errors() -> None:
    with pytest.raises(NgkitError, match=r"\[0, 8\)"):
        CodeUsageMetric().update(batch([[0, 1, 2, 8]]))
    with pytest.raises(NgkitError, match=r"\[B, 4\]"):
        CodeUsageMetric().update(batch([[0, 1, 2]]))


def test_beta_elbo_in_nats_and_bits_per_dimension() -> None:
    metric = BetaElboMetric()
    metric.update(batch([[0] * 4] * 2, beta_elbo=[-10.0, -20.0], shape=(3, 2, 2)))
    metric.update(batch([[0] * 4], beta_elbo=[-30.0], shape=(3, 2, 2)))
    result = metric.compute()
    assert result["beta_elbo"] == pytest.approx(-20.0)
    assert result["beta_elbo_bpd"] == pytest.approx(20.0 / (12 * math.log(2)))  # 12 = C*H*W
    assert metric.protocol()["images"] == 3 and metric.protocol()["dimensions"] == 12


def test_beta_elbo_reports_nothing_for_methods_without_one() -> None:
    metric = BetaElboMetric()
    metric.update(batch([[0] * 4]))
    assert metric.compute() == {}
    assert metric.protocol()["definition"] == "not defined for this method"


def test_beta_elbo_for_some_batches_only_is_an_error() -> None:
    metric = BetaElboMetric()
    metric.update(batch([[0] * 4], beta_elbo=[-1.0]))
    with pytest.raises(NgkitError, match="some batches"):
        metric.update(batch([[0] * 4]))


def _two_ranks(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    usage, elbo = CodeUsageMetric(), BetaElboMetric()
    if rank == 0:
        b = batch([[0, 0, 0, 0]], beta_elbo=[-4.0])
    else:
        b = batch([[1, 1, 2, 2], [3, 3, 3, 3]], beta_elbo=[-1.0, -1.0])
    usage.update(b)
    elbo.update(b)
    torch.save({**usage.compute(), **elbo.compute(), "tokens": usage.protocol()["tokens"]}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_compute_gathers_over_ranks(tmp_path: Path) -> None:
    out = str(tmp_path / "values")
    mp.spawn(_two_ranks, args=(str(tmp_path / "init"), out), nprocs=2)
    # Union of both ranks: code 0 x4, 1 x2, 2 x2, 3 x4 over 12 tokens; β-ELBO (-4 - 1 - 1) / 3.
    p = torch.tensor([4, 2, 2, 4], dtype=torch.float64) / 12
    perplexity = math.exp(float(-(p * p.log()).sum()))
    for rank in (0, 1):
        values = torch.load(f"{out}.{rank}")
        assert values["tokens"] == 12
        assert values["code_usage"] == 4 / 8 and values["dead_codes"] == 4
        assert values["code_perplexity"] == pytest.approx(perplexity)
        assert values["beta_elbo"] == pytest.approx(-2.0)
