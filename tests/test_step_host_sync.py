"""The step without host syncs computes what the step with them computed, bit for bit.

The reference below is the step as it was before logs stayed on the device (commit 663090f,
``ngkit.engine.step.train_step``, copied verbatim but for names): every micro-batch read its
loss's finiteness and the flags' all-reduce on the host, and every log value with ``.item()``.
Both run from the same seed on the same batches; parameters, the guard's decisions and the logs
must be identical, through ``train()``'s log window too.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from ngkit.engine import train_loop
from ngkit.engine.build import build
from ngkit.engine.deepspeed_engine import make_engine
from ngkit.engine.distributed import all_ranks_agree, init_distributed
from ngkit.engine.gradients import adaptive_clip_
from ngkit.engine.step import StepPlan, StepResult, host_floats, train_step
from ngkit.engine.seeding import seed_everything
from ngkit.errors import TrainingError
from ngkit.recipe import parse_recipe
from tiny_recipe import tiny


def reference_step(engine, batches, step, plan, *, stop_requested=lambda: False,
                   save_overdue=lambda: False, timer=None) -> StepResult:
    """Today's step before the change: host syncs per micro-batch and per log value."""
    method, guard = engine.module, engine.ngkit_optimizer
    finite, stop, save_due, images, micro_logs = True, False, False, 0, []
    for micro in range(plan.accumulate):
        x = next(batches).to(plan.device, plan.dtype, non_blocking=True)
        images += len(x)
        try:
            out, failure = engine(x, step), None
        except Exception as exc:
            out, failure = None, exc
        loss_ok = failure is None and bool(torch.isfinite(out.loss).all())
        all_ran, all_finite, no_stop, not_due = all_ranks_agree(
            failure is None, loss_ok, not stop_requested(), not save_overdue(), device=plan.device
        )
        if not all_ran:
            if failure is not None:
                raise failure
            raise TrainingError(f"another rank failed at step {step}; its log has the error")
        finite, stop, save_due = finite and all_finite, stop or not no_stop, save_due or not not_due
        engine.backward(out.loss)
        if micro < plan.accumulate - 1:
            engine.step()
        micro_logs.append(out.logs)
    if plan.clip == "agc" and finite:
        adaptive_clip_(plan.params, plan.clip_value)
    guard.loss_ok, guard.applied = finite, False
    engine.step()
    logs = {}
    if guard.applied:
        as_float = lambda v: float(v.item() if isinstance(v, torch.Tensor) else v)  # noqa: E731
        logs = {k: sum(as_float(m[k]) for m in micro_logs) / len(micro_logs) for k in micro_logs[0]}
        logs.update({k: as_float(v) for k, v in method.after_step(step).items()})
    return StepResult(guard.applied, logs, stop, save_due, images)


def _run(step_fn, recipe, steps: int, poison: set[int]):
    """``steps`` steps of ``recipe`` from its seed; the loss is made NaN at the steps in ``poison``."""
    init_distributed(torch.device("cpu"))
    seed_everything(recipe.run.seed)
    built = build(recipe)
    engine = make_engine(built.method, recipe)
    forward = engine.module.forward

    def poisoned(x, step):
        out = forward(x, step)
        return out._replace(loss=out.loss * float("nan")) if step in poison else out

    engine.module.forward = poisoned
    seed_everything(recipe.run.seed, 0)
    torch.manual_seed(1)
    batches = iter([torch.rand(recipe.data.batch_size, 1, 8, 8) for _ in range(steps * recipe.optim.accumulate)])
    plan = StepPlan.of(engine, recipe, torch.device("cpu"), torch.float32)
    results = [step_fn(engine, batches, step, plan) for step in range(1, steps + 1)]
    return results, [p.detach().clone() for p in engine.module.parameters()]


@pytest.mark.parametrize("method", ["daps-na", "reinforce"])
def test_step_without_host_syncs_is_bit_identical(method, one_thread):
    recipe = parse_recipe(tiny(method={"name": method, "samples": 4}, optim={"accumulate": 2, "clip": "agc"},
                               run={"device": "cpu"}), "tiny")
    poison = {3}
    old, old_params = _run(reference_step, recipe, 5, poison)
    new, new_params = _run(train_step, recipe, 5, poison)
    assert [r.applied for r in old] == [r.applied for r in new] == [s not in poison for s in range(1, 6)]
    for o, n in zip(old, new):
        assert list(o.logs) == list(n.logs)
        assert any(isinstance(v, torch.Tensor) for v in n.logs.values()) or not n.logs  # left on the device
        got = host_floats(n.logs)
        for key, value in o.logs.items():  # same bits; NaN compares equal to NaN
            assert got[key] == value or (math.isnan(got[key]) and math.isnan(value)), key
    assert all(torch.equal(a, b) for a, b in zip(old_params, new_params))


def test_host_floats_keeps_order_and_plain_floats():
    logs = {"a": torch.tensor(0.1, dtype=torch.float64), "b": 2.5, "c": torch.tensor(3.0, dtype=torch.float32)}
    assert host_floats(logs) == {"a": 0.1, "b": 2.5, "c": 3.0} and list(host_floats(logs)) == ["a", "b", "c"]


def test_train_log_window_is_bit_identical(tmp_path, monkeypatch, one_thread):
    """``train()`` with the reference step and with the new one writes the same train records
    (but the wall-clock rate) and the same final metrics."""
    raw = tiny(optim={"accumulate": 2}, run={"device": "cpu", "steps": 6, "log_every": 3, "eval_every": 0,
                                             "checkpoint_every": 0})
    records = {}
    for name, fn in (("old", reference_step), ("new", train_step)):
        monkeypatch.setattr(train_loop, "train_step", fn)
        result = train_loop.train(parse_recipe(raw, "tiny"), tmp_path / name, quiet=True)
        lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        records[name] = [{k: v for k, v in r.items() if k != "images_per_s"} for r in lines]
        assert all(isinstance(v, (int, float, str)) for r in lines for v in r.values())
        records[name].append(result.summary["metrics"])
    assert records["old"] == records["new"]
    assert [r["step"] for r in records["new"][:-1] if r["kind"] == "train"] == [3, 6]
