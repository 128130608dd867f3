"""β schedules: the weight of KL(q‖uniform prior) over training (METHOD.md step 10).

The paper anneals β exponentially (ImageNet 50 → 1, CIFAR-10 6 → 0.01, MNIST 0.5 → 0.01) over
the whole run, as the reference's ``auto_exp_decay``: β(t) = start·(end/start)^(t/steps).
β(step ≤ 0) = start and β(step ≥ steps) = end exactly; ``steps`` defaults to the run's
``total_steps``.
"""

from __future__ import annotations

import math

from ngkit import hookimpl
from ngkit.components import Register


class Constant:
    """A fixed β (1.0 is the plain ELBO)."""

    def __init__(self, value: float = 1.0) -> None:
        if not value >= 0:
            raise ValueError(f'beta schedule "constant": value must be >= 0, got {value}')
        self.value = value

    def __call__(self, step: int) -> float:
        return self.value


class _Interpolated:
    """start → end over ``steps`` steps, then constant; subclasses give the shape on t ∈ (0, 1)."""

    name = ""

    def __init__(self, *, start: float, end: float, steps: int | None = None, total_steps: int) -> None:
        self.steps = total_steps if steps is None else steps
        if self.steps < 1:
            raise ValueError(f'beta schedule "{self.name}": steps must be >= 1, got {self.steps}')
        if not (start >= 0 and end >= 0):
            raise ValueError(f'beta schedule "{self.name}": start and end must be >= 0, got {start}, {end}')
        self.start = start
        self.end = end

    def __call__(self, step: int) -> float:
        if step <= 0:
            return self.start
        if step >= self.steps:
            return self.end
        return self._interpolate(step / self.steps)

    def _interpolate(self, t: float) -> float:
        raise NotImplementedError


class Linear(_Interpolated):
    name = "linear"

    def _interpolate(self, t: float) -> float:
        return self.start + t * (self.end - self.start)


class Exponential(_Interpolated):
    """Geometric interpolation (linear in log β), the paper's schedule."""

    name = "exponential"

    def __init__(self, *, start: float, end: float, steps: int | None = None, total_steps: int) -> None:
        if not (start > 0 and end > 0):
            raise ValueError(
                f'beta schedule "exponential": start and end must be > 0 (it interpolates log β), '
                f'got {start}, {end}; use "linear" or "cosine" to reach 0'
            )
        super().__init__(start=start, end=end, steps=steps, total_steps=total_steps)

    def _interpolate(self, t: float) -> float:
        return math.exp(math.log(self.start) + t * (math.log(self.end) - math.log(self.start)))


class Cosine(_Interpolated):
    """Half-cosine: flat near both ends, fastest change at mid-run."""

    name = "cosine"

    def _interpolate(self, t: float) -> float:
        return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * t))


@hookimpl
def register_beta_schedules(register: Register) -> None:
    register("constant", Constant)
    register("linear", Linear)
    register("exponential", Exponential)
    register("cosine", Cosine)
