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

from ngkit.components import DEFER_LOGS
from ngkit.engine.distributed import all_ranks_agree, host_group
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
    host_group: Any = None  # process group for host-side agreements (None: the default group)

    @classmethod
    def of(cls, engine: Any, recipe: Recipe, device: torch.device, dtype: torch.dtype) -> StepPlan:
        """The plan of ``engine``'s run; every rank calls this at the same point (it may make the
        host group)."""
        params = [p for p in engine.module.parameters() if p.requires_grad]
        optim = recipe.optim
        return cls(device, dtype, optim.accumulate, optim.clip, optim.clip_value, params, host_group())


@dataclass
class StepResult:
    """The outcome of one optimiser step, agreed by every rank."""

    applied: bool  # the optimiser step was taken (False: skipped as non-finite)
    # mean over the micro-batches plus after_step's, empty when skipped; values are floats or
    # float64 scalars still on the device (host_floats copies them, once per log interval)
    logs: dict[str, float | Tensor]
    stop: bool  # some rank has been asked to stop
    save_due: bool  # some rank found a timed checkpoint overdue
    images: int  # images this rank trained on


def _device_logs(logs: dict[str, Any]) -> dict[str, float | Tensor]:
    """Floats stay floats; tensors become detached float64 scalars where they are (the exact
    value ``float(t.item())`` would give, without waiting for it)."""
    return {k: v.detach().double() if isinstance(v, Tensor) else float(v) for k, v in logs.items()}


def host_floats(logs: dict[str, float | Tensor]) -> dict[str, float]:
    """Every value as a float, the device's in one copy per device (a host sync: call it at the
    log interval, not every step)."""
    out = {k: v for k, v in logs.items() if not isinstance(v, Tensor)}
    by_device: dict[torch.device, list[str]] = defaultdict(list)
    for k, v in logs.items():
        if isinstance(v, Tensor):
            by_device[v.device].append(k)
    for keys in by_device.values():
        out.update(zip(keys, torch.stack([logs[k].double().reshape(()) for k in keys]).tolist()))
    return {k: out[k] for k in logs}


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
    """One optimiser step of ``engine`` (``plan.accumulate`` micro-batches from ``batches``).

    Nothing here waits for the device but the guard's one all-reduce per optimiser step (the
    finiteness of every rank's losses and gradients, whose answer decides the step): logs stay on
    the device (see :func:`ngkit.components.host_logs`), and the host facts every rank must
    decide alike (a forward that raised, a stop signal, a timed save) are agreed over a host
    process group, which never waits for queued kernels."""
    phase = timer if timer is not None else (lambda name: nullcontext())
    method, guard = engine.module, engine.ngkit_optimizer
    # DeepSpeed keeps bf16/fp16 weights (fp32 masters in the optimiser); autocast makes the
    # float32 tensors that plugins create (statistics, embeddings) meet them in that precision.
    autocast = torch.autocast(plan.device.type, dtype=plan.dtype, enabled=plan.dtype != torch.float32)
    finite: bool | Tensor = True  # this rank's losses so far, a bool tensor on the device
    stop, save_due, images, micro_logs = False, False, 0, []
    deferred = DEFER_LOGS.set(True)
    try:
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
                all_ran, no_stop, not_due = all_ranks_agree(
                    failure is None, not stop_requested(), not save_overdue(), group=plan.host_group
                )
                if failure is None:
                    finite = finite & torch.isfinite(out.loss).all()
            if not all_ran:
                if failure is not None:
                    raise failure
                raise TrainingError(f"another rank failed at step {step}; its log has the error")
            stop, save_due = stop or not no_stop, save_due or not not_due
            # A non-finite loss still runs backward (DeepSpeed's collectives and micro-step
            # counters must advance on every rank); the guard refuses its gradients below.
            with phase("backward"):
                engine.backward(out.loss)
            if micro < plan.accumulate - 1:
                with phase("optimizer"):
                    engine.step()  # DeepSpeed only accumulates here
            micro_logs.append(_device_logs(out.logs))
        if plan.clip == "agc":
            # Clipped whatever the losses (asking would wait for the device): gradients of a
            # non-finite loss stay non-finite, and the guard refuses them.
            with phase("guard/clipping"):
                guard.clipped = adaptive_clip_(plan.params, plan.clip_value)
        guard.loss_ok, guard.applied = finite, False
        with phase("optimizer"):
            engine.step()
        logs: dict[str, float | Tensor] = {}
        if guard.applied:
            # the sum from 0 then one division, as a float mean would be computed: same bits
            logs = {k: sum(m[k] for m in micro_logs) / len(micro_logs) for k in micro_logs[0]}
            with phase("after_step"):
                logs.update(_device_logs(method.after_step(step)))
    finally:
        DEFER_LOGS.reset(deferred)
    return StepResult(guard.applied, logs, stop, save_due, images)


def logs_read_at(step: int, log_every: int, steps: int, seconds: float = 0.0, elapsed: float = 0.0,
                 step_s: float = 0.0) -> bool:
    """Whether step ``step``'s logs will be read: it closes a log window (a multiple of
    ``log_every``, or the last step), or, under a ``[run] seconds`` budget, the budget may run out
    within it or the next one (``elapsed`` seconds run so far, the last step took ``step_s``)."""
    return step % log_every == 0 or step == steps or bool(seconds and elapsed + 2 * step_s >= seconds)
