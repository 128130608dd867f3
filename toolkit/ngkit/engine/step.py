"""One optimiser step of the DeepSpeed engine: the code path ``ngkit run`` and ``ngkit bench`` share.

:func:`train_step` reads ``accumulate`` micro-batches, runs the method's forward and
``engine.backward`` on each, clips, lets the guarded optimiser step, and calls ``after_step``
when the step was taken. With a :class:`PhaseTimer` (``ngkit bench``) it also records where the
time went; :func:`instrument` adds the model's own phases (sampling, teacher-forced pass,
decoder) by timing those calls, without changing what runs.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ngkit.engine.artifacts import to_float
from ngkit.engine.distributed import all_ranks_agree
from ngkit.engine.gradients import adaptive_clip_
from ngkit.errors import TrainingError
from ngkit.recipe import Recipe

# Phases measured inside the method's forward (and the guard inside the optimiser step); the
# time they take is not counted again in the phase that contains them.
MODEL_PHASES = {
    "sampling + teacher-forced pass": ("encoder", "sample_log_prob"),  # what sample/log_prob leave
    "sampling": ("encoder", "sample"),
    "teacher-forced pass": ("encoder", "log_prob"),
    "encoder features": ("encoder", "features"),  # VQ-VAE/FSQ; inside the others it counts there
    "decoder forward": ("decoder", "forward"),
}


class PhaseTimer:
    """Seconds per named phase, exclusive of the phases timed inside it. ``clock="wall"``: wall
    time (on CUDA every boundary synchronises, so kernels are charged to the phase that launched
    them); ``"cpu"``: this process's CPU time, which other jobs on a shared CPU do not inflate."""

    def __init__(self, device: torch.device, clock: str = "wall") -> None:
        if clock not in ("wall", "cpu"):
            raise ValueError(f'clock must be "wall" or "cpu", got {clock!r}')
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = device.type == "cuda"
        self._clock = time.perf_counter if clock == "wall" else time.process_time
        self._stack: list[list[Any]] = []  # [name, start of the current uninterrupted stretch]

    def now(self) -> float:
        """The clock's reading after the device's queued work is done."""
        if self.sync:
            torch.cuda.synchronize()
        return self._clock()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if name == "encoder features" and self._stack and self._stack[-1][0] in MODEL_PHASES:
            yield  # features() inside log_prob(): charged to the teacher-forced pass
            return
        now = self.now()
        if self._stack:
            parent = self._stack[-1]
            self.seconds[parent[0]] += now - parent[1]
        self._stack.append([name, now])
        try:
            yield
        finally:
            now = self.now()
            top = self._stack.pop()
            self.seconds[top[0]] += now - top[1]
            if self._stack:
                self._stack[-1][1] = now


def instrument(module: torch.nn.Module, optimizer: Any, timer: PhaseTimer) -> None:
    """Time the model's phases of ``module`` (a method) and the optimiser's guard: each call is
    wrapped on the instance, so the method's own code runs unchanged."""

    def wrap(owner: Any, attr: str, phase: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with timer(phase):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)

    for phase, (part, attr) in MODEL_PHASES.items():
        owner = getattr(module, part, None)
        if owner is not None and hasattr(owner, attr):
            wrap(owner, attr, phase)
    wrap(optimizer, "gradients_ok", "guard/clipping")


@dataclass(frozen=True)
class StepPlan:
    """What every step needs, fixed for a run: where the data goes and how the step is finished."""

    device: torch.device
    dtype: torch.dtype
    accumulate: int
    clip: str  # "agc", "norm" (DeepSpeed's own) or "none"
    clip_value: float
    params: list[torch.nn.Parameter]  # trainable, for adaptive clipping

    @classmethod
    def of(cls, engine: Any, recipe: Recipe, device: torch.device, dtype: torch.dtype) -> StepPlan:
        params = [p for p in engine.module.parameters() if p.requires_grad]
        optim = recipe.optim
        return cls(device, dtype, optim.accumulate, optim.clip, optim.clip_value, params)


@dataclass
class StepResult:
    """The outcome of one optimiser step, agreed by every rank."""

    applied: bool  # the optimiser step was taken (False: skipped as non-finite)
    logs: dict[str, float]  # mean over the micro-batches plus after_step's; empty when skipped
    stop: bool  # some rank has been asked to stop
    save_due: bool  # some rank found a timed checkpoint overdue
    images: int  # images this rank trained on


def train_step(
    engine: Any,
    batches: Iterator[Tensor],
    step: int,
    plan: StepPlan,
    *,
    stop_requested: Callable[[], bool] = lambda: False,
    save_overdue: Callable[[], bool] = lambda: False,
    timer: PhaseTimer | None = None,
) -> StepResult:
    """One optimiser step of ``engine`` (``plan.accumulate`` micro-batches from ``batches``)."""
    phase = timer if timer is not None else (lambda name: nullcontext())
    method, guard = engine.module, engine.ngkit_optimizer
    # DeepSpeed keeps bf16/fp16 weights (fp32 masters in the optimiser); autocast makes the
    # float32 tensors that plugins create (statistics, embeddings) meet them in that precision.
    autocast = torch.autocast(plan.device.type, dtype=plan.dtype, enabled=plan.dtype != torch.float32)
    finite, stop, save_due, images, micro_logs = True, False, False, 0, []
    for micro in range(plan.accumulate):
        with phase("data"):
            x = next(batches).to(plan.device, plan.dtype, non_blocking=True)
        images += len(x)
        with phase("forward (rest)"):
            try:
                with autocast:
                    out, failure = engine(x, step), None
            except Exception as exc:  # the other ranks must not wait for this one in a collective
                out, failure = None, exc
            # One all-reduce settles what every rank must decide alike: did every forward run,
            # is every loss finite, has any rank been asked to stop, is a timed save due.
            loss_ok = failure is None and bool(torch.isfinite(out.loss).all())
            all_ran, all_finite, no_stop, not_due = all_ranks_agree(
                failure is None, loss_ok, not stop_requested(), not save_overdue(), device=plan.device
            )
        if not all_ran:
            if failure is not None:
                raise failure
            raise TrainingError(f"another rank failed at step {step}; its log has the error")
        finite, stop, save_due = finite and all_finite, stop or not no_stop, save_due or not not_due
        # A non-finite loss still runs backward (DeepSpeed's collectives and micro-step
        # counters must advance on every rank); the guard refuses its gradients below.
        with phase("backward"):
            engine.backward(out.loss)
        if micro < plan.accumulate - 1:
            with phase("optimizer"):
                engine.step()  # DeepSpeed only accumulates here
        micro_logs.append(out.logs)
    if plan.clip == "agc" and finite:
        with phase("guard/clipping"):
            adaptive_clip_(plan.params, plan.clip_value)
    guard.loss_ok, guard.applied = finite, False
    with phase("optimizer"):
        engine.step()
    logs: dict[str, float] = {}
    if guard.applied:
        logs = {k: sum(to_float(m[k]) for m in micro_logs) / len(micro_logs) for k in micro_logs[0]}
        with phase("after_step"):
            logs.update({k: to_float(v) for k, v in method.after_step(step).items()})
    return StepResult(guard.applied, logs, stop, save_due, images)
