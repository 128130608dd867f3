"""The cheaper DAPS step (issue 24) computes what the old one computed, bit for bit.

What changed, each against a frozen copy of the code before it (commit 6ef0b5e):
- the factorised encoder reads the K samples' log q from the one ``[B, L, V]`` copy of its
  log-probs (``_gather_samples``) instead of gathering from ``base.expand(K, ...)``, and DAPS
  reads everything else from that one copy (``_one_copy``, ``_SampledLogProbs``) instead of
  slicing the expanded tensor: no ``[K, B, L, V]`` tensor forward or backward;
- ZeRO-0 adaptive clipping scales every gradient in one fused multiply and hands the guard what
  its norms say about finiteness (``ClippedFinite``); the guard then skips its own norm;
- one rank skips the all-reduces of the host flags and of the guard's flags, and DeepSpeed's
  ``zero_grad`` walks a list made once.

The K samples' gradients are the same additions in both, and the same bits where torch's sum over
K adds in order (one thread, K <= 16, B*L*V a multiple of 64; the tiny recipe's 16 x 16 x 16
is); elsewhere they differ by that reassociation only, which the last test bounds.
"""

from __future__ import annotations

import math

import pytest
import torch

from ngkit.engine import distributed, gradients
from ngkit.engine import step as step_module
from ngkit.engine.build import build
from ngkit.engine.deepspeed_engine import make_engine
from ngkit.engine.distributed import init_distributed
from ngkit.engine.seeding import seed_everything
from ngkit.engine.step import StepPlan, host_floats, train_step
from ngkit.components import TokenLogProb
from ngkit.recipe import parse_recipe
from ngkit_plugins import daps_method, transformer_encoder
from tiny_recipe import tiny


# ---- frozen copies of the code before the change -------------------------------------------

def old_factorised_score(base, z):
    logp = base if z.dim() == 2 else base.expand(z.shape[0], *base.shape)
    entropy = transformer_encoder._entropy(base).expand(z.shape)
    token_logq = logp.gather(-1, z.unsqueeze(-1)).squeeze(-1)
    return TokenLogProb(logq=token_logq.sum(-1), logits=logp, entropy=entropy)


def old_sampled(self, enc, z):
    """Before: log q from the encoder (or gathered from the K expanded copies), and the logits
    everything else read sliced from them (``_kl_view``)."""
    return None, self._kl_view(enc.logits)


def old_clip_plain(params, clip, eps):
    flat = [p for p in params if p.ndim <= 1]
    mats = [p for p in params if p.ndim > 1]
    rows = [p.shape[0] for p in mats]
    norm = torch.linalg.vector_norm
    w, g = [], []
    if flat:
        w.append(torch.stack(torch._foreach_norm([p.detach().float() for p in flat])))
        g.append(torch.stack(torch._foreach_norm([p.grad.float() for p in flat])))
    w += [norm(p.detach().float().reshape(r, -1), dim=1) for p, r in zip(mats, rows)]
    g += [norm(p.grad.float().reshape(r, -1), dim=1) for p, r in zip(mats, rows)]
    scales = (torch.cat(w).clamp_min(eps) * clip / torch.cat(g).clamp_min(1e-6)).clamp(max=1.0)
    flat_scales, *mat_scales = scales.split([len(flat)] + rows)
    if flat:
        torch._foreach_mul_([p.grad for p in flat], [s.to(p.grad.dtype) for s, p in zip(flat_scales.unbind(), flat)])
    for p, r, scale in zip(mats, rows, mat_scales):
        p.grad.mul_(scale.reshape((r,) + (1,) * (p.ndim - 1)).to(p.grad.dtype))
    return None  # the old guard took its own norm


def old_all_ranks_agree(*flags, device="cpu", group=None):
    """Before: the flags all-reduced whenever a process group is up, one rank included."""
    device = torch.device(device)
    if any(isinstance(f, torch.Tensor) for f in flags):
        values = torch.stack([f.to(device, torch.float32) if isinstance(f, torch.Tensor)
                              else torch.full((), float(f), device=device) for f in flags])
    else:
        values = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MIN, group=group)
    return [v > 0 for v in values.tolist()]


@pytest.fixture
def old_code(monkeypatch):
    """A switch to the code before the change (undone when the test ends)."""
    def switch():
        monkeypatch.setattr(transformer_encoder, "_factorised_score", old_factorised_score)
        monkeypatch.setattr(daps_method.Daps, "_sampled", old_sampled)
        monkeypatch.setattr(gradients, "_clip_plain", old_clip_plain)
        monkeypatch.setattr(distributed, "all_ranks_agree", old_all_ranks_agree)  # the guard's
        monkeypatch.setattr(step_module, "all_ranks_agree", old_all_ranks_agree)  # the host flags'
    return switch


# ---- the training step, old and new --------------------------------------------------------

def _run(recipe, steps, old):
    init_distributed(torch.device("cpu"))
    seed_everything(recipe.run.seed)
    engine = make_engine(build(recipe).method, recipe)
    seed_everything(recipe.run.seed, 0)
    torch.manual_seed(1)
    batches = iter([torch.rand(recipe.data.batch_size, 1, 8, 8) for _ in range(steps * recipe.optim.accumulate)])
    plan = StepPlan.of(engine, recipe, torch.device("cpu"), torch.float32)
    if old:  # DeepSpeed's own zero_grad
        del engine.zero_grad
    logs = [host_floats(train_step(engine, batches, step, plan).logs) for step in range(1, steps + 1)]
    return logs, [p.detach().clone() for p in engine.module.parameters()]


SETTINGS = {
    "sequence K=4 agc": ({"credit": "sequence", "samples": 4}, {"clip": "agc"}, 0),
    "sequence K=8 usage terms agc": ({"credit": "sequence", "samples": 8, "marginal_kl": 1.0, "token_entropy": 0.3,
                                      "step_size": {"name": "kl"}}, {"clip": "agc"}, 0),
    "token K=8 usage terms no clip": ({"credit": "token", "samples": 8, "marginal_kl": 1.0, "token_entropy": 0.3},
                                      {"clip": "none"}, 0),
    "token K=8 accumulate 2 agc": ({"credit": "token", "samples": 8, "marginal_kl": 0.5},
                                   {"clip": "agc", "accumulate": 2}, 0),
    "first-order K=4 usage terms agc": ({"credit": "first-order", "samples": 4, "marginal_kl": 1.0,
                                         "token_entropy": 0.3, "step_size": {"name": "kl"}}, {"clip": "agc"}, 0),
    "token K=8 ZeRO 2 agc": ({"credit": "token", "samples": 8, "token_entropy": 0.3}, {"clip": "agc"}, 2),
    "sequence K=8 ZeRO 2 no clip": ({"credit": "sequence", "samples": 8, "marginal_kl": 1.0}, {"clip": "none"}, 2),
    "token trust region": ({"credit": "token", "samples": 4, "trust_region": 0.1, "marginal_kl": 1.0},
                           {"clip": "agc"}, 0),
    "reinforce": (None, {"clip": "agc"}, 0),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_step_is_bit_identical_to_the_old_step(name, old_code, one_thread):
    method, optim, zero = SETTINGS[name]
    method = {"name": "reinforce", "samples": 8} if method is None else {"name": "daps-na", **method}
    recipe = parse_recipe(tiny(method=method, optim=optim, distributed={"zero_stage": zero}, run={"device": "cpu"}),
                          "tiny")
    new_logs, new_params = _run(recipe, 4, old=False)
    old_code()
    old_logs, old_params = _run(recipe, 4, old=True)
    assert [list(o) for o in old_logs] == [list(n) for n in new_logs] and len(new_logs[-1]) > 3
    for o, n in zip(old_logs, new_logs):
        for key, value in o.items():  # same bits; NaN compares equal to NaN
            assert n[key] == value or (math.isnan(n[key]) and math.isnan(value)), key
    moved = [not torch.equal(a, b) for a, b in zip(new_params, _run(recipe, 0, old=False)[1])]
    assert sum(moved) > len(moved) // 2  # the steps trained: this compares something
    assert all(torch.equal(a, b) for a, b in zip(old_params, new_params))


# ---- the pieces, on shapes the training test does not reach --------------------------------

def _k_copies_grad(base, z, weights, dense):
    """The old formula: log q gathered from K expanded copies, ``dense`` read from copy 0."""
    logits = base.expand(z.shape[0], *base.shape)
    logq = logits.gather(-1, z.unsqueeze(-1)).squeeze(-1)
    loss = (weights * logq).sum() + sum((d * f(logits[:1])).sum() for d, f in dense)
    return logq, torch.autograd.grad(loss, base)[0]


DENSE = [(1.7, torch.exp), (-0.3, lambda t: t)]  # two terms on the one copy, like marginal_kl and entropy


@pytest.mark.parametrize("k", [2, 4, 8, 16])
@pytest.mark.parametrize("dense", [False, True])
def test_one_copy_matches_k_copies_bit_for_bit(k, dense, one_thread):
    """B*L*V = 5*3*64: torch's sum over the K copies adds in order, so the bits agree; codes drawn
    from 3 of 64 so that samples often share a code (their gradients then add at one place)."""
    torch.manual_seed(k)
    h = torch.randn(5, 3, 64, dtype=torch.float32, requires_grad=True)
    base = torch.log_softmax(h * 4, dim=-1)
    z = torch.randint(0, 3, (k, 5, 3))
    weights = torch.randn(k, 5, 3)
    terms = DENSE if dense else []
    logq, expected = _k_copies_grad(base, z, weights, terms)
    got_logq = transformer_encoder._gather_samples(base, z)  # the encoder's (no dense terms)
    token_logq, one = daps_method._SampledLogProbs.apply(base, z)  # DAPS's
    assert torch.equal(got_logq, logq) and torch.equal(token_logq, logq) and torch.equal(one, base)
    loss = (weights * token_logq).sum() + sum((d * f(one[None])).sum() for d, f in terms)
    assert torch.equal(torch.autograd.grad(loss, base, retain_graph=True)[0], expected)
    if not dense:
        assert torch.equal(torch.autograd.grad((weights * got_logq).sum(), base)[0], expected)


def test_one_copy_elsewhere_differs_only_by_reassociation(one_thread):
    """V = 12 (B*L*V = 240, not a multiple of 64): torch groups the K terms differently on some
    columns. Both results are then within float32 rounding of the float64 sum, and at codes no two
    samples drew (the dense terms and at most one sample's: any grouping adds them alike) equal."""
    torch.manual_seed(0)
    h = torch.randn(5, 4, 12, dtype=torch.float64, requires_grad=True)
    z = torch.randint(0, 12, (8, 5, 4))
    weights = torch.randn(8, 5, 4, dtype=torch.float64)
    base64 = torch.log_softmax(h, -1)
    _, exact = _k_copies_grad(base64, z, weights, DENSE)
    base = torch.log_softmax(h.float(), -1)
    _, old = _k_copies_grad(base, z, weights.float(), DENSE)
    token_logq, one = daps_method._SampledLogProbs.apply(base, z)
    loss = (weights.float() * token_logq).sum() + sum((d * f(one[None])).sum() for d, f in DENSE)
    new = torch.autograd.grad(loss, base)[0]
    tolerance = 8 * torch.finfo(torch.float32).eps * exact.abs().max().item()
    for g in (old, new):
        torch.testing.assert_close(g.double(), exact, rtol=0, atol=tolerance)
    assert not torch.equal(old, new)  # the case this test is about
    index = z.permute(1, 2, 0)
    draws = torch.zeros(5, 4, 12, dtype=torch.long).scatter_add_(-1, index, torch.ones_like(index))
    alone = draws <= 1  # codes no two samples drew: the dense terms plus at most one sample's
    assert alone.any() and torch.equal(new[alone], old[alone])


def test_one_copy_is_found_only_for_expand_views():
    base = torch.randn(3, 4, 5)
    assert daps_method._one_copy(base.expand(6, 3, 4, 5)) is base
    assert daps_method._one_copy(base.expand(6, 3, 4, 5).clone()) is None  # K tensors of their own
    assert daps_method._one_copy(torch.randn(3, 6, 4, 5).transpose(0, 1)) is None  # autoregressive
    assert daps_method._one_copy(base[:, :2].expand(6, 3, 2, 5)) is None  # a view of something larger


def test_guard_uses_the_clip_norms_only_when_they_are_certain():
    """The clipped gradients' finiteness from the clip's norms where that is sure; where a unit's
    norm overflowed with finite elements (its clipped gradient is 0, finite) the guard's own norm
    decides, as before."""
    params = [torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(3))]
    guard = gradients.GuardedAdamW(params)
    cases = [(1e-3, True, True), (float("nan"), False, False), (float("inf"), False, False), (3e19, False, True)]
    for value, certain, finite in cases:
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        params[0].grad[1] = value  # one row: 3 elements of 3e19 overflow its norm, not float32
        guard.clipped = gradients.adaptive_clip_(params, 1.0)
        assert guard.clipped is not None and bool(guard.clipped.certain) == certain, value
        assert bool(guard.grads_finite()) == finite and guard.clipped is None, value
        assert bool(torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params]))) == finite
    guard.clipped = gradients.adaptive_clip_(params[:1], 1.0)  # covers other gradients than the guard's
    params[1].grad[0] = float("nan")
    assert not guard.grads_finite()
