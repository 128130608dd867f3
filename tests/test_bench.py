"""``ngkit bench`` on a tiny model, and the fast paths it measures: the same numbers as before."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import tomli_w
import torch

from ngkit.cli.main import main
from ngkit.components import ImageSpec, LatentSpec
from ngkit.engine.deepspeed_engine import denormal_mode, make_engine
from ngkit.engine.distributed import init_distributed
from ngkit.engine.gradients import GuardedAdamW
from ngkit.engine.step import PhaseTimer
from ngkit.recipe import parse_recipe
from ngkit_plugins.transformer_encoder import TransformerEncoder
from tiny_recipe import tiny


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(tomli_w.dumps(tiny(run={"steps": 10, "device": "cpu"})))
    return path


def test_bench_reports_phases_floor_memory_and_vqvae_ratio(recipe_file, capsys, one_thread):
    # One timed step: its phases are that step's own, so they must add up to it. CPU clock: on a
    # loaded machine wall time also counts the preemptions between phases (a 15 % gap was seen).
    assert main(["bench", str(recipe_file), "--steps", "1", "--warmup", "1", "--json", "--clock", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    timing = report["timing"]
    assert timing["method"] == "daps-na" and timing["samples"] == 4 and report["batch"] == 16
    phases = timing["phases_ms"]
    expected = {"data", "forward (rest)", "sampling + teacher-forced pass", "decoder forward", "backward",
                "guard/clipping", "optimizer", "after_step"}
    assert expected <= set(phases), sorted(phases)
    assert all(ms >= 0 for ms in phases.values())
    assert sum(phases.values()) == pytest.approx(timing["step_ms"], rel=0.05)
    assert timing["images_per_s"] == pytest.approx(16 / (timing["step_ms"] / 1e3), rel=0.01)
    # the floor of DAPS-NA: decoder on K*B images and one teacher-forced pass, both with backward
    assert set(timing["floor_parts_ms"]) == {"decoder fwd+bwd (K*B images)", "teacher-forced pass fwd+bwd"}
    assert timing["floor_ms"] == pytest.approx(sum(timing["floor_parts_ms"].values()))
    assert timing["step_over_floor"] == pytest.approx(timing["step_ms"] / timing["floor_ms"])
    baseline = report["baseline"]
    assert baseline["method"] == "vqvae" and baseline["floor_ms"] is None
    assert report["ratio_to_baseline"] == pytest.approx(timing["step_ms"] / baseline["step_ms"])
    assert report["peak_rss_mb"] > 50 and report["cuda_max_allocated_mb"] is None


def test_bench_method_option_and_table(recipe_file, capsys, one_thread):
    assert main(["bench", str(recipe_file), "--method", "vqvae", "--steps", "2", "--warmup", "0", "--clock", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "vqvae: where a step goes" in out and "encoder features" in out and "cpu clock" in out
    assert "step / floor" not in out and "on the same model" not in out  # no floor; no baseline but itself


def test_phase_timer_charges_nested_time_once():
    timer = PhaseTimer(torch.device("cpu"))
    with timer("forward (rest)"):
        with timer("teacher-forced pass"):
            with timer("encoder features"):  # inside a model phase: counted there
                pass
        with timer("decoder forward"):
            pass
    assert set(timer.seconds) == {"forward (rest)", "teacher-forced pass", "decoder forward"}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_one_pass_draws_what_two_passes_draw(dropout):
    """Factorised encoder: codes drawn from the teacher-forced pass's own logits. Without dropout
    the codes, log q and gradient equal those of sample() then log_prob(); with dropout the draw
    and the score share one dropout mask, so log q is that of the logits the codes came from."""
    torch.manual_seed(0)
    enc = TransformerEncoder(image=ImageSpec(1, 8, 8), latent=LatentSpec((4, 4), 16), width=32, depth=1,
                             heads=2, latent_depth=1, factorised=True, dropout=dropout)
    x = torch.rand(3, 1, 8, 8)
    torch.manual_seed(1)
    z1, one = enc.sample_log_prob(x, 5)
    g1 = torch.autograd.grad(one.logq.sum(), enc.head.weight)[0]
    torch.manual_seed(1)
    z2, _ = enc.sample(x, 5)
    two = enc.log_prob(x, z2)
    g2 = torch.autograd.grad(two.logq.sum(), enc.head.weight)[0]
    assert z1.shape == (5, 3, 16) and one.logq.shape == (5, 3) and one.entropy.shape == (5, 3, 16)
    if dropout == 0:
        assert torch.equal(z1, z2) and torch.equal(one.logq, two.logq) and torch.equal(g1, g2)
    else:
        assert not torch.equal(one.logq, two.logq)
        again = one.logits.gather(-1, z1.unsqueeze(-1)).squeeze(-1).sum(-1)
        assert torch.equal(again, one.logq)


def test_guard_sees_one_bad_gradient_among_many():
    params = [torch.nn.Parameter(torch.ones(5, 3)) for _ in range(4)]
    guard = GuardedAdamW(params)
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    assert guard.grads_finite()
    for bad in (float("nan"), float("inf"), -float("inf")):
        params[2].grad[1, 1] = bad
        assert not guard.grads_finite()


@pytest.mark.parametrize("flush", [True, False])
def test_recipe_switches_denormal_flushing(flush):
    recipe = parse_recipe(tiny(distributed={"flush_denormal": flush}, run={"device": "cpu"}), "tiny")
    init_distributed(torch.device("cpu"))
    from ngkit.engine.build import build

    engine = make_engine(build(recipe).method, recipe)
    assert engine.enable_backward_allreduce is False  # one rank, ZeRO 0: nothing to average

    def flushed() -> bool:
        return (torch.tensor([1e-39]) * torch.tensor([1.0])).item() == 0.0  # a float32 denormal

    assert not flushed()
    with denormal_mode(recipe, torch.device("cpu")):
        assert flushed() == flush
    assert not flushed()  # the process-wide setting is given back


def test_adaptive_clipping_in_one_go_equals_one_parameter_at_a_time():
    from ngkit.engine.gradients import adaptive_clip_, agc_scale

    torch.manual_seed(0)
    shapes = [(), (7,), (5, 3), (4, 2, 3, 3)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p, size in zip(params, (0.01, 3.0, 0.1, 3.0)):  # some units clipped, some not
        p.grad = torch.randn_like(p) * size
    scales = [agc_scale(p.detach(), p.grad, 0.5) for p in params]
    assert any((s < 1).any() for s in scales) and any((s == 1).any() for s in scales)
    expected = [p.grad * s for p, s in zip(params, scales)]
    adaptive_clip_(params, 0.5)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=0)


def _imported_by(code: str) -> list[str]:
    heavy = ("torch", "torchmetrics", "scipy", "matplotlib", "deepspeed")
    probe = f"import sys\n{code}\nprint(' '.join(m for m in {heavy!r} if m in sys.modules))"
    env = {**os.environ, "NGKIT_PLUGINS": ""}
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


def test_start_up_imports_stay_light():
    """`ngkit --help` needs no torch; loading the plugins (`ngkit plugins`, `recipes validate`)
    needs torch but not torchmetrics, scipy, matplotlib or DeepSpeed (docs/performance.md)."""
    assert _imported_by("import ngkit.cli.main") == []
    assert _imported_by("from ngkit.plugins import get_plugin_manager; get_plugin_manager()") == ["torch"]
