"""DAPS and DAPS-NA (docs/daps.md is the spec and maps each formula to code).

The encoder is a policy, the decoder log-likelihood its reward; the encoder is fitted by
weighted maximum likelihood to the proxy posterior q~ over its own K samples, and no gradient
flows through the sampled codes. Every step also measures the encoder's real step,
``encoder_kl`` = KL(q_old ‖ q_new) per image; ``trust_region > 0`` bounds it (MPO's M-step).
Gradient clipping and skipping non-finite steps are the engine's job.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor

from ngkit import hookimpl
from ngkit.components import (
    BetaSchedule,
    Decoder,
    Encoder,
    PosteriorProxy,
    Ref,
    Register,
    StepOutput,
    StepSizePolicy,
    host_logs,
)
from ngkit.methods.beta import reward_scale
from ngkit.methods.categorical_vae import CategoricalVAE, DeadCodeSplitter
from ngkit.methods.trust_region import EncoderTrustRegion, token_kl

NGKIT_PLUGIN_API = 2  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")


class Daps(CategoricalVAE):
    """DAPS with any categorical encoder (autoregressive or factorised)."""

    name = "daps"  # as registered, for error messages
    factorised_only = False

    def __init__(
        self,
        *,
        encoder: Encoder,
        decoder: Decoder,
        beta: BetaSchedule,
        samples: int = 8,
        proxy: Annotated[PosteriorProxy, Ref("posterior_proxies")] = "daps",  # type: ignore[assignment]
        step_size: Annotated[StepSizePolicy, Ref("step_size_policies")] = "ess",  # type: ignore[assignment]
        split_dead_codes: int = 0,
        split_below: float = 0.1,
        split_noise: float = 0.1,
        one_pass: bool = True,
        trust_region: float = 0.0,
        trust_region_lr: float = 0.3,
        trust_region_init: float = 1.0,
    ) -> None:
        """``split_dead_codes``: every that many steps, codes drawn less than ``split_below``
        times their uniform share take over part of a used code (:class:`DeadCodeSplitter`);
        0 (the paper) never. ``one_pass``: draw the K codes from the logits of the teacher-forced
        pass where the encoder can (factorised: one pass instead of two; docs/performance.md).
        ``trust_region``: bound ε in nats per image on the encoder's real step KL(q_old ‖ q_new),
        enforced by a multiplier α (start ``trust_region_init``) learned by dual ascent at
        ``trust_region_lr`` in log α (:class:`EncoderTrustRegion`); 0 (the paper) leaves the step
        to the optimiser."""
        if self.factorised_only and encoder.autoregressive:
            raise ValueError(
                f'method "{self.name}" needs a factorised (non-autoregressive) encoder, but the '
                "encoder is autoregressive; set `[model.encoder] factorised = true` in the recipe, "
                'or use method "daps" for an autoregressive encoder'
            )
        if samples < 2:
            raise ValueError(f'method "{self.name}": samples (K) must be >= 2 to compare codes, got {samples}')
        super().__init__(encoder, decoder)
        self.beta = beta
        self.samples = samples
        self.one_pass = one_pass
        self.proxy = proxy
        self.step_size = step_size  # an nn.Module policy becomes a submodule: its state is checkpointed
        self._last: tuple[Tensor, Tensor, float] | None = None
        self.splitter = DeadCodeSplitter(self.latent.codes, split_dead_codes, split_noise, split_below)
        # (x, z, logits before the step) of the last batch: encoder_kl is measured on it after the
        # step, and with a trust region the next step's penalty pulls back toward those logits.
        self._step_batch: tuple[Tensor, Tensor, Tensor] | None = None
        self._anchor: tuple[Tensor, Tensor, Tensor] | None = None
        self.trust = (
            EncoderTrustRegion(trust_region, trust_region_lr, trust_region_init) if trust_region > 0 else None
        )

    def forward(self, x: Tensor, step: int) -> StepOutput:  # type: ignore[override]
        if self.one_pass:  # z [K, B, L] drawn without gradient, logq [K, B] with it
            z, enc = self.encoder.sample_log_prob(x, self.samples)
        else:
            z, _ = self.encoder.sample(x, self.samples)
            enc = self.encoder.log_prob(x, z)  # teacher-forced
        self.splitter.observe(z)
        logp, _ = self.decoder_log_prob(x, z)  # [K, B]
        logp_sg, logq_sg = logp.detach(), enc.logq.detach()
        self._step_batch = (x.detach(), z, self._kl_view(enc.logits.detach()))
        beta_schedule = float(self.beta(step))
        beta = beta_schedule * reward_scale(self.beta, logp_sg)

        eta = self.step_size.eta(logp_sg, logq_sg, beta)
        proxy = self.proxy(logp_sg, logq_sg, eta, beta)
        weights = proxy.weights.detach().float()
        policy_loss = -(weights * enc.logq.float()).sum(0).mean()
        gen_loss = -logp.mean()
        loss = policy_loss + gen_loss
        self._last = (logp_sg, logq_sg, beta)
        trust_stats = self._trust_region_penalty(self.trust) if self.trust is not None else {}
        if trust_stats:
            loss = loss + trust_stats["tr_penalty"]

        adv = proxy.advantages
        stats = {
            "loss": loss,
            "policy_loss": policy_loss,
            "gen_loss": gen_loss,
            "eta": torch.as_tensor(eta),
            "ess": proxy.ess / self.samples,  # fraction of K
            "kl": proxy.kl,  # nats, sample estimate of KL(q~||q)
            "logp": logp_sg.mean(),
            "logq": logq_sg.mean(),
            "entropy": enc.entropy.detach().mean(),  # nats per token
            "advantage_mean": adv.mean(),
            "advantage_std": adv.std(dim=0).mean(),  # spread over the K samples of an image
            "weight_max": proxy.weights.amax(dim=0).mean(),
        }
        stats.update(trust_stats)
        logs = host_logs(stats)
        logs["beta"] = beta
        if beta != beta_schedule:
            logs["beta_schedule"] = beta_schedule
        return StepOutput(loss=loss, logs=logs)

    def _kl_view(self, logits: Tensor) -> Tensor:
        """The logits KL(q_old ‖ q_new) needs: a factorised encoder's are the same for all K
        samples, so one copy gives the exact KL; an autoregressive encoder's depend on z."""
        return logits if self.encoder.autoregressive else logits[:1]

    def _kl_codes(self, z: Tensor) -> Tensor:
        return z if self.encoder.autoregressive else z[:1]

    def _trust_region_penalty(self, trust: EncoderTrustRegion) -> dict[str, Tensor]:
        """α·KL(q_prev ‖ q_θ) on the previous step's batch, with gradient into the encoder: q_prev
        is the encoder before the previous step, so the KL is that step's real move and its
        gradient pulls back against it (zero on the first step, where there is no previous one)."""
        if self._anchor is None:
            return {}
        x_prev, z_prev, old_logits = self._anchor
        new_logits = self.encoder.log_prob(x_prev, self._kl_codes(z_prev)).logits
        kl = token_kl(old_logits, new_logits).mean()
        return {"tr_penalty": trust.penalty(kl).float(), "tr_kl": kl.detach()}

    def after_step(self, step: int) -> dict[str, float]:
        """Let the step-size policy adapt on the batch of the step just taken (with gradient
        accumulation: the last micro-batch), measure the encoder's real step on it
        (``encoder_kl``) and, with a trust region, take the dual step on α."""
        if self._last is None:
            return {}
        logp, logq, beta = self._last
        self._last = None
        logs = self.step_size.update(logp, logq, beta)
        logs.update(self._measure_step())
        return {**logs, **self.splitter.maybe_split(step, self.encoder, self.decoder)}

    @torch.no_grad()
    def _measure_step(self) -> dict[str, float]:
        """``encoder_kl``: mean over the last batch of KL(q_old(·|x) ‖ q_new(·|x)) across the
        optimiser step just taken (exact if factorised, sampled along z ~ q_old if
        autoregressive); with a trust region it also takes the dual step on α."""
        if self._step_batch is None:
            return {}
        x, z, old_logits = self._step_batch
        self._step_batch = None
        new_logits = self.encoder.log_prob(x, self._kl_codes(z)).logits
        kl = token_kl(old_logits, new_logits).mean()
        logs = {"encoder_kl": float(kl)}
        if self.trust is not None:
            logs.update(self.trust.update(kl))
            self._anchor = (x, z, old_logits)
        return logs

    def get_rank_state(self) -> dict[str, list[Tensor]]:
        """This rank's trust-region anchor (its previous batch, codes and logits), saved in its
        checkpoint file so that the first step after ``--resume`` has the penalty the
        uninterrupted run's has (:mod:`ngkit.engine.rank_state`)."""
        return {"anchor": list(self._anchor) if self._anchor is not None else []}

    def set_rank_state(self, state: dict[str, list[Tensor]]) -> None:
        device = next(self.parameters()).device
        anchor = [t.to(device) for t in state["anchor"]]
        self._anchor = (anchor[0], anchor[1], anchor[2]) if anchor else None


class DapsNA(Daps):
    """DAPS-NA: the same update, checked to run on a factorised encoder q(z|x) = Π_l q(z_l|x)."""

    name = "daps-na"
    factorised_only = True


@hookimpl
def register_methods(register: Register) -> None:
    register("daps", Daps)
    register("daps-na", DapsNA)
