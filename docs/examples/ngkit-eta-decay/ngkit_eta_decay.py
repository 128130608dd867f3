"""Step-size policy ``eta-decay``: η falls geometrically from ``start`` to ``end`` over the run,
so early DAPS steps are small (large η) and later ones larger.

Use it from a recipe::

    [method.step_size]
    name = "eta-decay"
    start = 100.0
    end = 10.0
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ngkit import hookimpl

NGKIT_PLUGIN_API = 3  # the ngkit plugin API this module was written for


class EtaDecay(nn.Module):
    def __init__(self, *, total_steps: int, start: float = 100.0, end: float = 10.0) -> None:
        super().__init__()
        self.total_steps, self.start, self.end = total_steps, start, end
        # A buffer, so the position in the schedule is saved in checkpoints.
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def eta(self, logp: Tensor, logq: Tensor, beta: float) -> Tensor:
        frac = min(1.0, self.updates.item() / max(1, self.total_steps))
        return torch.tensor(self.start * (self.end / self.start) ** frac, dtype=torch.float64)

    def update(self, logp: Tensor, logq: Tensor, beta: float) -> dict[str, float]:
        self.updates += 1
        return {"eta": float(self.eta(logp, logq, beta))}


@hookimpl
def register_step_size_policies(register) -> None:
    register("eta-decay", EtaDecay)
