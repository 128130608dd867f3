"""An exponential moving average of the encoder's and decoder's weights (``[run] ema``).

After every optimiser step that was applied (a skipped, non-finite step changes no weight, so it
changes no average) the shadow ``e`` of each parameter ``p`` moves as

    e_n = d_n * e_{n-1} + (1 - d_n) * p_n,   d_n = min(ema, (1 + n) / (10 + n)),   e_0 = p_0,

``n`` counting the updates. The warm-up ``(1 + n) / (10 + n)`` is TensorFlow's
``ExponentialMovingAverage(num_updates=n)``: early on the average forgets the random initial
weights quickly (its horizon is about n / 9 updates) and only later reaches the recipe's horizon
of ``1 / (1 - ema)`` steps, so a short run's average is not dominated by its first weights.

Shadows are float32 whatever the training precision. They travel in the checkpoint's client
state (plain tensors, read back with ``torch.load(weights_only=True)``), are swapped into the
module for held-out evaluation (:meth:`Ema.swapped`) and are what ``ngkit export`` writes by
default. ZeRO-3 partitions every parameter over the ranks, so no rank holds whole weights to
average: it is refused at start-up.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from ngkit.errors import RecipeError

PARTS = ("encoder", "decoder")  # the method's submodules whose parameters are averaged
STATE_KEY = "ema"  # key of the shadows in the checkpoint's client state


def warmed_decay(decay: float, updates: int) -> float:
    """The decay of the ``updates``-th update (1-based): ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1 + updates) / (10 + updates))


def averaged_parameters(method: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters of the method's encoder and decoder, by state-dict name."""
    return {
        name: p for name, p in method.named_parameters()
        if p.requires_grad and name.split(".")[0] in PARTS
    }


class Ema:
    """Float32 shadows of :func:`averaged_parameters`, updated by :meth:`update`."""

    def __init__(self, method: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow: dict[str, Tensor] = {
            name: p.detach().float().clone() for name, p in averaged_parameters(method).items()
        }

    @torch.no_grad()
    def update(self, method: nn.Module) -> None:
        """One step of the average towards the method's current weights (after an applied step)."""
        self.updates += 1
        d = warmed_decay(self.decay, self.updates)
        params = averaged_parameters(method)
        shadows = [self.shadow[name] for name in params]
        torch._foreach_lerp_(shadows, [p.detach().float() for p in params.values()], 1.0 - d)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the shadows, the decay and the update count."""
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        """Restore :meth:`state_dict` (bit for bit); a checkpoint of other weights is refused."""
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            missing, unexpected = sorted(set(self.shadow) - set(shadow)), sorted(set(shadow) - set(self.shadow))
            raise RecipeError(source, [
                f"[run.ema] the checkpoint's averaged weights do not fit this model (missing: "
                f"{', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'})"
            ])
        self.updates = int(state["updates"])
        for name, value in shadow.items():
            self.shadow[name].copy_(value)

    @contextmanager
    def swapped(self, method: nn.Module) -> Iterator[None]:
        """The method with the averaged weights inside the block, its own weights restored after."""
        params = averaged_parameters(method)
        raw = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(raw[name])


def make_ema(method: nn.Module, decay: float, zero_stage: int, source: str = "recipe") -> Ema | None:
    """The run's average, or None when ``[run] ema`` is 0."""
    if decay == 0:
        return None
    if zero_stage == 3:
        raise RecipeError(source, [
            "[run.ema] weight averaging needs whole parameters on every rank, and ZeRO stage 3 "
            "partitions them; use [distributed] zero_stage = 2 (or 0/1), or set [run] ema = 0"
        ])
    if not averaged_parameters(method):
        raise RecipeError(source, ["[run.ema] the method has no trainable encoder or decoder parameters to average"])
    return Ema(method, decay)


def apply_to_state(module: dict[str, Tensor], shadow: dict[str, Tensor]) -> dict[str, Tensor]:
    """A method state dict with the averaged weights in place of the raw ones (for export),
    each cast to the dtype the raw weight was saved in."""
    out = dict(module)
    for name, value in shadow.items():
        out[name] = value.to(module[name].dtype)
    return out


def weights_for_eval(ema: Ema | None, method: nn.Module) -> Any:
    """The context held-out evaluation runs in: the averaged weights when there is an average."""
    return nullcontext() if ema is None else ema.swapped(method)
