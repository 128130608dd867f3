"""Policy-gradient baselines: REINFORCE with a leave-one-out baseline, and PPO as in the DAPS
paper's comparison (reference code ``jadex/algorithms/vae/models/ppo.py``). The encoder is a
policy over token sequences, log p(x|z) the reward; no gradient flows through z."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngkit import hookimpl
from ngkit.components import BetaSchedule, Decoder, Encoder, ImageSpec, Register, StepOutput, host_logs
from ngkit.distributed import mean_over_ranks
from ngkit.methods.categorical_vae import CategoricalVAE

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")

KL_BAND = 1.5  # PPO-penalty: adapt when KL leaves [target/1.5, target*1.5] (Schulman et al. 2017, §4)
KL_GAIN = 2.0  # ... by halving or doubling the coefficient (same source)
KL_COEF_RANGE = (1e-3, 1e3)  # clip of the coefficient (reference code's configs)



def leave_one_out(reward: Tensor) -> Tensor:
    """Advantages ``r_k - mean_{j != k} r_j`` over the K samples (dim 0) of each image; the
    baseline of sample k does not depend on z_k, so the estimator stays unbiased."""
    k = reward.shape[0]
    return reward - (reward.sum(0, keepdim=True) - reward) / (k - 1)


class Reinforce(CategoricalVAE):
    """Score-function estimator of the β-ELBO gradient with K samples per image.

    Reward r = log p(x|z) - β (log q(z|x) + L log V), detached: a one-sample estimate of the
    β-ELBO, whose gradient is E_q[r ∇log q] (the score of the prior term's own log q has mean
    zero). The decoder is trained on all K samples.
    """

    def __init__(self, *, encoder: Encoder, decoder: Decoder, beta: BetaSchedule, samples: int = 8) -> None:
        super().__init__(encoder, decoder)
        if samples < 2:
            raise ValueError(f"reinforce: samples = {samples}; the leave-one-out baseline needs at least 2")
        self.beta = beta
        self.samples = samples

    def forward(self, x: Tensor, step: int) -> StepOutput:  # type: ignore[override]
        beta = self.beta(step)
        z, _ = self.encoder.sample(x, self.samples)  # [K, B, L], no gradient
        logq = self.encoder.log_prob(x, z).logq  # [K, B], teacher-forced, x encoded once
        logp, _ = self.decoder_log_prob(x, z)
        kl = logq.detach() + self.latent.tokens * math.log(self.latent.codes)  # log q/uniform
        advantage = leave_one_out(logp.detach() - beta * kl)
        policy_loss = -(advantage * logq).mean()
        loss = policy_loss - logp.mean()
        logs = host_logs({"loss": loss, "logp": logp.mean(), "kl": kl.mean(), "policy_loss": policy_loss})
        return StepOutput(loss, {**logs, "beta": beta})


def clipped_surrogate(
    logq: Tensor, logq_old: Tensor, advantages: Tensor, clip: float
) -> tuple[Tensor, Tensor]:
    """PPO's clipped objective as a loss, -mean min(ρA, clip(ρ, 1-ε, 1+ε)A) with
    ρ = q/q_old, and the fraction of samples whose ratio lies outside [1-ε, 1+ε]."""
    ratio = (logq - logq_old).exp()
    objective = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    return -objective.mean(), ((ratio - 1).abs() > clip).float().mean()


def adapt_kl_coef(coef: float, kl: float, target: float) -> float:
    """PPO-penalty's rule: halve the coefficient when KL < target/1.5, double it above 1.5 target."""
    if kl < target / KL_BAND:
        coef /= KL_GAIN
    elif kl > target * KL_BAND:
        coef *= KL_GAIN
    return min(max(coef, KL_COEF_RANGE[0]), KL_COEF_RANGE[1])


@dataclass
class Rollout:
    """Samples kept for later policy updates."""

    x: Tensor  # [B, C, H, W]
    z: Tensor  # [K, B, L] codes
    old_logits: Tensor  # [K, B, L, V] log-probabilities under the encoder that drew z
    advantages: Tensor  # [K, B] normalised


def concat(rollouts: list[Rollout]) -> Rollout:
    """Rollouts of several steps as one batch (images along B)."""
    return Rollout(
        torch.cat([r.x for r in rollouts]),
        torch.cat([r.z for r in rollouts], 1),
        torch.cat([r.old_logits for r in rollouts], 1),
        torch.cat([r.advantages for r in rollouts], 1),
    )


class ValueNet(nn.Module):
    """Predicts an image's standardised reward (its baseline) from the image alone."""

    def __init__(self, image: ImageSpec, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(image.channels, width, 4, 2, 1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 4, 2, 1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)


class PPO(CategoricalVAE):
    """Proximal policy optimisation of the encoder (Schulman et al. 2017), clipped ratio plus
    an adaptive KL penalty, as in the DAPS paper's baseline.

    Each step draws K samples per image from the current encoder, trains the decoder and the
    value network on them and stores them with their advantages and the drawing encoder's
    per-token log-probabilities. The policy update of a step uses the rollouts stored in the
    previous ``epochs`` steps, so the ratio q_θ/q_old compares the encoder with the (one or more
    steps older) snapshot that drew the samples; only the very first step, with nothing
    stored, updates on its own samples (ratio 1). Policy loss: clipped surrogate
    + kl_coef * KL(q_old || q) + β * KL(q || uniform), both KLs exact per token along the stored
    sequence. kl_coef is halved or doubled after each step to hold KL(q_old || q) near
    ``kl_target`` (nats per image).

    Rewards are log p(x|z). The value network predicts each image's reward standardised over
    the batch (rewards are summed log-likelihoods whose scale drifts as the decoder learns);
    advantages are the standardised reward minus that prediction, normalised over the batch.
    Assumes one forward per optimiser step (no gradient accumulation).
    """

    def __init__(
        self,
        *,
        encoder: Encoder,
        decoder: Decoder,
        beta: BetaSchedule,
        image: ImageSpec,
        samples: int = 1,
        epochs: int = 1,
        clip: float = 0.2,
        kl_target: float = 0.025,
        kl_coef: float = 10.0,
    ) -> None:
        super().__init__(encoder, decoder)
        if samples < 1 or epochs < 1:
            raise ValueError(f"ppo: samples = {samples} and epochs = {epochs} must both be at least 1")
        if not (clip > 0 and kl_target > 0 and kl_coef > 0):
            raise ValueError(f"ppo: clip, kl_target and kl_coef must be > 0, got {clip}, {kl_target}, {kl_coef}")
        self.beta = beta
        self.samples = samples
        self.clip = clip
        self.kl_target = kl_target
        self.value = ValueNet(image)
        self.register_buffer("kl_coef", torch.tensor(float(kl_coef)))
        self._stored: deque[Rollout] = deque(maxlen=epochs)
        self._pending: tuple[Rollout, Tensor] | None = None  # this step's rollout and KL(q_old || q)

    def _rollout(self, x: Tensor) -> tuple[Rollout, Tensor, Tensor]:
        """Fresh samples with advantages; returns the rollout, log p ``[K, B]`` (with gradient
        to the decoder) and the value network's loss."""
        z, _ = self.encoder.sample(x, self.samples)
        logp, _ = self.decoder_log_prob(x, z)
        reward = logp.detach()
        standard = (reward - reward.mean()) / (reward.std(unbiased=False) + 1e-8)
        value = self.value(x)
        value_loss = (value - standard.mean(0)).pow(2).mean()
        advantage = standard - value.detach()
        advantage = (advantage - advantage.mean()) / (advantage.std(unbiased=False) + 1e-8)
        with torch.no_grad():
            old = F.log_softmax(self.encoder.log_prob(x, z).logits.float(), dim=-1)
        return Rollout(x, z, old, advantage), logp, value_loss

    def forward(self, x: Tensor, step: int) -> StepOutput:  # type: ignore[override]
        beta = self.beta(step)
        fresh, logp, value_loss = self._rollout(x)
        batch = concat(list(self._stored) or [fresh])
        new = F.log_softmax(self.encoder.log_prob(batch.x, batch.z).logits.float(), dim=-1)
        pick = batch.z.unsqueeze(-1)
        logq, logq_old = (t.gather(-1, pick).squeeze(-1).sum(-1) for t in (new, batch.old_logits))
        surrogate, clip_frac = clipped_surrogate(logq, logq_old, batch.advantages, self.clip)
        old_kl = (batch.old_logits.exp() * (batch.old_logits - new)).sum((-2, -1)).mean()
        prior_kl = (new.exp() * (new + math.log(self.latent.codes))).sum((-2, -1)).mean()
        policy_loss = surrogate + self.kl_coef * old_kl + beta * prior_kl
        loss = policy_loss + value_loss - logp.mean()
        self._pending = (fresh, old_kl.detach())
        stats = {
            "loss": loss,
            "logp": logp.mean(),
            "kl": prior_kl,  # KL(q || uniform) per image, on the stored samples' paths
            "policy_loss": policy_loss,
            "value_loss": value_loss,
            "old_kl": old_kl,  # KL(q_old || q) per image
            "clip_frac": clip_frac,
            "kl_coef": self.kl_coef,
        }
        return StepOutput(loss, {**host_logs(stats), "beta": beta})

    def get_rank_state(self) -> dict[str, list[list[Tensor]]]:
        """This rank's stored rollouts (the next policy updates use them), saved in its checkpoint
        file so that ``--resume`` is exact (:mod:`ngkit.engine.rank_state`)."""
        return {"stored": [[r.x, r.z, r.old_logits, r.advantages] for r in self._stored]}

    def set_rank_state(self, state: dict[str, list[list[Tensor]]]) -> None:
        device = next(self.parameters()).device
        self._stored.clear()
        self._stored.extend(Rollout(*(t.to(device) for t in rollout)) for rollout in state["stored"])

    @torch.no_grad()
    def after_step(self, step: int) -> dict[str, float]:
        if self._pending is None:
            return {}
        rollout, kl = self._pending
        self._pending = None
        self._stored.append(rollout)
        kl = mean_over_ranks(kl)  # one coefficient on every rank
        self.kl_coef.fill_(adapt_kl_coef(self.kl_coef.item(), kl.item(), self.kl_target))
        return {"kl_coef": self.kl_coef.item()}


@hookimpl
def register_methods(register: Register) -> None:
    register("reinforce", Reinforce)
    register("ppo", PPO)
