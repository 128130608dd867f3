"""How a method reads a β schedule's ``relative`` option (part of ngkit's plugin API): β
schedules (``register_beta_schedules``) and the methods that use them agree through it."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ngkit.distributed import mean_over_ranks


def reward_scale(schedule: Any, logp: Tensor) -> float:
    """What the schedule's β is multiplied by for rewards ``logp [K, B]``: 1 for ``relative =
    "none"`` (or a schedule without the option); for ``"advantage_spread"`` the mean over images
    of std_k log p(x|z), averaged over ranks so every rank uses the same β (floored at 1e-6 nats
    so identical samples do not zero β)."""
    if getattr(schedule, "relative", "none") == "none":
        return 1.0
    spread = logp.detach().double().std(dim=0).mean().reshape(1)
    return max(float(mean_over_ranks(spread)[0]), 1e-6)
