"""Test-only plugins: methods that inject faults or record per-rank state (never shipped)."""

from __future__ import annotations

import json
import types
from pathlib import Path

from typing import Annotated

import torch

from ngkit import hookimpl
from ngkit.components import BetaSchedule, Decoder, Encoder, LatentSpec, PosteriorProxy, Ref, StepSizePolicy
from ngkit_plugins.daps_method import Daps
from ngkit_plugins.quantized_methods import FSQAutoencoder
from ngkit.components import Quantizer


class _PoisonGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class PoisonedFSQ(FSQAutoencoder):
    """FSQ whose gradient is NaN at ``poison_steps`` on rank ``poison_rank`` (mod world size)."""

    def __init__(
        self, *, encoder: Encoder, decoder: Decoder, latent: LatentSpec,
        quantizer: Annotated[Quantizer, Ref("quantizers")] = "fsq",  # type: ignore[assignment]
        poison_steps: list[int] = (), poison_rank: int = 0,
    ) -> None:
        super().__init__(encoder=encoder, decoder=decoder, latent=latent, quantizer=quantizer)
        self.poison_steps, self.poison_rank = set(poison_steps), poison_rank

    def forward(self, x, step):
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        out = super().forward(x, step)
        if step in self.poison_steps and _rank() == self.poison_rank % world:
            out = type(out)(_PoisonGrad.apply(out.loss), out.logs)
        return out


class SlowFSQ(PoisonedFSQ):
    """FSQ whose every step takes at least ``seconds`` (to signal a run mid-step)."""

    def __init__(
        self, *, encoder: Encoder, decoder: Decoder, latent: LatentSpec,
        quantizer: Annotated[Quantizer, Ref("quantizers")] = "fsq",  # type: ignore[assignment]
        seconds: float = 0.5,
    ) -> None:
        super().__init__(encoder=encoder, decoder=decoder, latent=latent, quantizer=quantizer)
        self.seconds = seconds

    def forward(self, x, step):
        import time

        time.sleep(self.seconds)
        return super().forward(x, step)


class ProbedDaps(Daps):
    """DAPS that appends, after every applied step, this rank's η and RNG fingerprint to a file."""

    def __init__(
        self, *, encoder: Encoder, decoder: Decoder, beta: BetaSchedule, probe: str,
        samples: int = 8,
        proxy: Annotated[PosteriorProxy, Ref("posterior_proxies")] = "daps",  # type: ignore[assignment]
        step_size: Annotated[StepSizePolicy, Ref("step_size_policies")] = "ess",  # type: ignore[assignment]
    ) -> None:
        super().__init__(encoder=encoder, decoder=decoder, beta=beta, samples=samples, proxy=proxy, step_size=step_size)
        self.probe = probe

    def after_step(self, step):
        logs = super().after_step(step)
        eta = float(self.step_size.log_eta.exp())
        record = {"step": step, "eta": eta, "rng": hash(torch.get_rng_state().numpy().tobytes())}
        with Path(self.probe.format(rank=_rank())).open("a") as f:
            f.write(json.dumps(record) + "\n")
        return logs


def _register(register) -> None:
    register("fsq-poisoned", PoisonedFSQ)
    register("daps-probed", ProbedDaps)
    register("fsq-slow", SlowFSQ)


fault_plugin = types.SimpleNamespace(register_methods=hookimpl(_register))


if __name__ == "__main__":  # `python fault_plugins.py run ...`: the ngkit CLI with these plugins
    import sys

    from ngkit.cli.main import main
    from ngkit.plugins import temporary_plugin

    with temporary_plugin(fault_plugin, "fault_plugins"):
        sys.exit(main(sys.argv[1:]))
