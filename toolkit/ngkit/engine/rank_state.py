"""State of a method that is neither a parameter nor a buffer, and differs between ranks.

DeepSpeed saves one copy of the module (rank 0's); state built from each rank's own batches (the
trust region's anchor, PPO's stored rollouts, the dead-code counts) goes into every rank's own
checkpoint file instead. A module of the method (the method itself or any submodule) opts in with
``get_rank_state() -> dict`` of tensors, lists and numbers, and ``set_rank_state(state)``; the
file is read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def collect(method: nn.Module) -> dict[str, Any]:
    """``{module name: its get_rank_state()}`` for every module of ``method`` that has one."""
    return {name: module.get_rank_state() for name, module in method.named_modules()
            if callable(getattr(module, "get_rank_state", None))}


def restore(method: nn.Module, state: dict[str, Any]) -> None:
    """Hand each module its saved state; a module missing from ``state`` keeps its own."""
    modules = dict(method.named_modules())
    for name, saved in state.items():
        if name in modules and callable(getattr(modules[name], "set_rank_state", None)):
            modules[name].set_rank_state(saved)
