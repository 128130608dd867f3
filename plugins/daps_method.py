"""DAPS and DAPS-NA (METHOD.md "One training step"; docs/daps.md maps each formula to code).

The encoder is a policy, the decoder log-likelihood its reward; the encoder is fitted by
weighted maximum likelihood to the proxy posterior q~ over its own K samples, and no gradient
flows through the sampled codes. Gradient clipping and skipping non-finite steps are the
engine's job.
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
from ngkit_plugins.categorical_vae import CategoricalVAE, DeadCodeSplitter


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
    ) -> None:
        """``split_dead_codes``: every that many steps, codes drawn less than ``split_below``
        times their uniform share take over part of a used code (:class:`DeadCodeSplitter`);
        0 (the paper) never. ``one_pass``: draw the K codes from the logits of the teacher-forced
        pass where the encoder can (factorised: one pass instead of two; docs/performance.md)."""
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

    def forward(self, x: Tensor, step: int) -> StepOutput:  # type: ignore[override]
        beta = float(self.beta(step))
        if self.one_pass:  # z [K, B, L] drawn without gradient, logq [K, B] with it
            z, enc = self.encoder.sample_log_prob(x, self.samples)
        else:
            z, _ = self.encoder.sample(x, self.samples)
            enc = self.encoder.log_prob(x, z)  # teacher-forced
        self.splitter.observe(z)
        logp, _ = self.decoder_log_prob(x, z)  # [K, B]
        logp_sg, logq_sg = logp.detach(), enc.logq.detach()

        eta = self.step_size.eta(logp_sg, logq_sg, beta)
        proxy = self.proxy(logp_sg, logq_sg, eta, beta)
        weights = proxy.weights.detach().float()
        policy_loss = -(weights * enc.logq.float()).sum(0).mean()
        gen_loss = -logp.mean()
        loss = policy_loss + gen_loss
        self._last = (logp_sg, logq_sg, beta)

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
        logs = host_logs(stats)
        logs["beta"] = beta
        return StepOutput(loss=loss, logs=logs)

    def after_step(self, step: int) -> dict[str, float]:
        """Let the step-size policy adapt on the batch of the step just taken (with gradient
        accumulation: the last micro-batch)."""
        if self._last is None:
            return {}
        logp, logq, beta = self._last
        self._last = None
        logs = self.step_size.update(logp, logq, beta)
        return {**logs, **self.splitter.maybe_split(step, self.encoder, self.decoder)}


class DapsNA(Daps):
    """DAPS-NA: the same update, checked to run on a factorised encoder q(z|x) = Π_l q(z_l|x)."""

    name = "daps-na"
    factorised_only = True


@hookimpl
def register_methods(register: Register) -> None:
    register("daps", Daps)
    register("daps-na", DapsNA)
