"""Relaxation baselines: Gumbel-Softmax (Jang et al. 2017; Maddison et al. 2017) and Gumbel-Rao
Monte-Carlo, GR-MCK (Paulus, Maddison & Mnih 2021). Both maximise the β-ELBO
E[log p(x|z)] - w * KL(q(z|x) || uniform) by backpropagating through a relaxed token."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ngkit import hookimpl
from ngkit.components import BetaSchedule, Decoder, Encoder, Register, StepOutput, host_logs
from ngkit.methods.categorical_vae import CategoricalVAE

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")



def kl_to_uniform(logits: Tensor) -> Tensor:
    """KL(q || uniform) per image, summed over tokens, from per-token logits ``[B, L, V]``.

    For an autoregressive q these are the conditionals along the drawn sequence, a one-sample
    estimate of the sequence KL (exact for a factorised q)."""
    logq = F.log_softmax(logits.float(), dim=-1)
    return (logq.exp() * (logq + math.log(logits.shape[-1]))).sum((-2, -1))


def conditional_gumbel(logits: Tensor, z: Tensor, samples: int) -> Tensor:
    """``samples`` draws of standard Gumbel noise G ``[samples, ..., V]`` conditioned on
    argmax(logits + G) = z, detached.

    The max of logits + G is log Z + Gumbel(0); each other entry is a Gumbel(logits_i)
    truncated below it (Paulus et al. 2021, App.; Maddison et al. 2014, "A* sampling").
    Written with exponentials E ~ Exp(1): top = log Z - log E_z, other_i = -log(E_i e^-l_i + E_z/Z).
    """
    logits = logits.detach().float()
    log_e = torch.empty(samples, *logits.shape, device=logits.device).exponential_().log()
    log_e_z = log_e.gather(-1, z.expand(samples, *z.shape).unsqueeze(-1))
    log_z = logits.logsumexp(-1, keepdim=True)
    top = log_z - log_e_z
    others = -torch.logaddexp(log_e - logits, log_e_z - log_z)
    chosen = F.one_hot(z, logits.shape[-1]).bool()
    return torch.where(chosen, top, others) - logits


def gumbel_rao(logits: Tensor, z: Tensor, samples: int, temperature: float) -> Tensor:
    """One-hot ``z`` in the forward pass; backward through the average over conditional Gumbels
    of softmax((logits + G) / τ), the Rao-Blackwellised straight-through Gumbel-Softmax
    gradient. The noise is not differentiated (its expectation then equals ST-GS's)."""
    perturbed = logits.unsqueeze(0) + conditional_gumbel(logits, z, samples)
    surrogate = F.softmax(perturbed / temperature, dim=-1).mean(0).to(logits.dtype)  # noise is float32
    hard = F.one_hot(z, logits.shape[-1]).to(surrogate)
    return hard + surrogate - surrogate.detach()


class GumbelSoftmax(CategoricalVAE):
    """Decoder input ``decoder.embed(y)`` for a relaxed token ``y`` from
    ``encoder.relaxed_sample``; loss -log p(x|y) + w * KL(q || uniform), mean over images.

    w is ``kl_weight`` if given, else the run's β schedule (the same objective as DAPS's
    β-ELBO). The temperature falls exponentially from ``temperature_start`` to
    ``temperature_end`` over ``total_steps``. ``hard`` is the straight-through variant.
    """

    def __init__(
        self,
        *,
        encoder: Encoder,
        decoder: Decoder,
        beta: BetaSchedule,
        total_steps: int,
        temperature_start: float = 1.0,
        temperature_end: float = 0.5,
        hard: bool = False,
        kl_weight: float | None = None,
    ) -> None:
        super().__init__(encoder, decoder)
        if not (temperature_start > 0 and temperature_end > 0):
            raise ValueError(
                f"gumbel: temperature_start and temperature_end must be > 0, got {temperature_start}, {temperature_end}"
            )
        self.beta = beta
        self.total_steps = total_steps
        self.temperature_start = temperature_start
        self.temperature_end = temperature_end
        self.hard = hard
        self.kl_weight = kl_weight

    def temperature(self, step: int) -> float:
        frac = min(max(step / max(self.total_steps, 1), 0.0), 1.0)
        return self.temperature_start * (self.temperature_end / self.temperature_start) ** frac

    def relax(self, x: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """Relaxed tokens ``[B, L, V]`` with gradients and the logits they came from."""
        return self.encoder.relaxed_sample(x, temperature, self.hard)

    def forward(self, x: Tensor, step: int) -> StepOutput:  # type: ignore[override]
        tau = self.temperature(step)
        y, logits = self.relax(x, tau)
        logp = self.decoder.log_prob(x, self.decoder(self.decoder.embed(y)))
        kl = kl_to_uniform(logits)
        weight = self.beta(step) if self.kl_weight is None else self.kl_weight
        loss = (-logp + weight * kl).mean()
        logs = host_logs({"loss": loss, "logp": logp.mean(), "kl": kl.mean()})
        return StepOutput(loss, {**logs, "temperature": tau, "kl_weight": weight})


class GumbelRao(GumbelSoftmax):
    """GR-MCK: a hard sample z ~ q (forward pass one-hot), gradient from ``rao_samples``
    conditional Gumbel perturbations. Logits are the encoder's teacher-forced logits on z, so
    an autoregressive encoder is conditioned on its own hard tokens."""

    def __init__(
        self,
        *,
        encoder: Encoder,
        decoder: Decoder,
        beta: BetaSchedule,
        total_steps: int,
        temperature_start: float = 1.0,
        temperature_end: float = 0.5,
        kl_weight: float | None = None,
        rao_samples: int = 10,
    ) -> None:
        super().__init__(
            encoder=encoder,
            decoder=decoder,
            beta=beta,
            total_steps=total_steps,
            temperature_start=temperature_start,
            temperature_end=temperature_end,
            hard=True,
            kl_weight=kl_weight,
        )
        if rao_samples < 1:
            raise ValueError(f"gr-mck: rao_samples must be at least 1, got {rao_samples}")
        self.rao_samples = rao_samples

    def relax(self, x: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        z, _ = self.encoder.sample(x, 1)
        logits = F.log_softmax(self.encoder.log_prob(x, z[0]).logits, dim=-1)
        return gumbel_rao(logits, z[0], self.rao_samples, temperature), logits


@hookimpl
def register_methods(register: Register) -> None:
    register("gumbel", GumbelSoftmax)
    register("gr-mck", GumbelRao)
