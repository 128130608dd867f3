"""β schedules: the weight of KL(q‖uniform prior) over training (docs/daps.md "β schedules").

The paper anneals β exponentially over the whole run, as the reference's ``auto_exp_decay``:
β(t) = start·(end/start)^(t/steps); ImageNet 50 → 1 (DAPS and DAPS-NA), CIFAR-10 6 → 0.01
(DAPS) and 6 → 1 (DAPS-NA), MNIST 0.5 → 0.01. β(step ≤ 0) = start and β(step ≥ steps) = end
exactly; ``steps`` defaults to the run's ``total_steps``.

Every schedule takes ``relative``: ``"none"`` (the paper: β in nats) or ``"advantage_spread"``
(β in units of the batch's reward spread, the mean over images of the standard deviation of
log p(x|z) over the K samples), so one setting transfers across image sizes and run lengths
while the decoder's rewards grow.
"""

from __future__ import annotations

import math
from typing import Literal

from ngkit import hookimpl
from ngkit.components import Register

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")

Relative = Literal["none", "advantage_spread"]
RELATIVE = ("none", "advantage_spread")


def _check_relative(name: str, relative: str) -> None:
    if relative not in RELATIVE:
        raise ValueError(f'beta schedule "{name}": relative must be one of {", ".join(RELATIVE)}, got {relative!r}')


class Constant:
    """A fixed β (1.0 is the plain ELBO)."""

    def __init__(self, value: float = 1.0, relative: Relative = "none") -> None:
        if not value >= 0:
            raise ValueError(f'beta schedule "constant": value must be >= 0, got {value}')
        _check_relative("constant", relative)
        self.value = value
        self.relative = relative

    def __call__(self, step: int) -> float:
        return self.value


class _Interpolated:
    """start → end over ``steps`` steps, then constant; subclasses give the shape on t ∈ (0, 1)."""

    name = ""

    def __init__(
        self, *, start: float, end: float, steps: int | None = None, relative: Relative = "none", total_steps: int
    ) -> None:
        _check_relative(self.name, relative)
        self.relative = relative
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

    def __init__(
        self, *, start: float, end: float, steps: int | None = None, relative: Relative = "none", total_steps: int
    ) -> None:
        if not (start > 0 and end > 0):
            raise ValueError(
                f'beta schedule "exponential": start and end must be > 0 (it interpolates log β), '
                f'got {start}, {end}; use "linear" or "cosine" to reach 0'
            )
        super().__init__(start=start, end=end, steps=steps, relative=relative, total_steps=total_steps)

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
