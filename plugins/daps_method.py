"""DAPS and DAPS-NA (docs/daps.md is the spec and maps each formula to code).

The encoder is a policy, the decoder log-likelihood its reward; the encoder is fitted by
weighted maximum likelihood to the proxy posterior q~ over its own K samples, and no gradient
flows through the sampled codes. Every step also measures the encoder's real step,
``encoder_kl`` = KL(q_old ‖ q_new) per image; ``trust_region > 0`` bounds it, by a penalty (MPO's
M-step) or by projecting the step back (TRPO's line search). ``credit = "token"`` gives each token
of a factorised encoder its own reward and proxy weights. Gradient clipping and skipping
non-finite steps are the engine's job.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

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
    TokenLogProb,
    host_logs,
    logs_read,
)
from ngkit.errors import TrainingError
from ngkit.methods.beta import reward_scale
from ngkit.methods.categorical_vae import CategoricalVAE, DeadCodeSplitter
from ngkit.methods.marginal import marginal_kl as code_marginal_kl
from ngkit.methods.trust_region import EncoderTrustRegion, project_step, token_kl
from ngkit_plugins.daps_first_order import dense_token_proxy, first_order_rewards
from ngkit_plugins.daps_proxy import patch_rewards

TrustRegionMode = Literal["penalty", "project"]
Credit = Literal["sequence", "token", "first-order"]

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")


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
        trust_region_mode: TrustRegionMode = "penalty",
        credit: Credit = "sequence",
        marginal_kl: float = 0.0,
        token_entropy: float = 0.0,
        first_order_curvature: float = 0.0,
    ) -> None:
        """``split_dead_codes``: every that many steps, codes drawn less than ``split_below``
        times their uniform share take over part of a used code (:class:`DeadCodeSplitter`);
        0 (the paper) never. ``one_pass``: draw the K codes from the logits of the teacher-forced
        pass where the encoder can (factorised: one pass instead of two; docs/performance.md).
        ``trust_region``: bound ε in nats per image on the encoder's real step KL(q_old ‖ q_new),
        enforced by a multiplier α (start ``trust_region_init``) learned by dual ascent at
        ``trust_region_lr`` in log α (:class:`EncoderTrustRegion`); 0 (the paper) leaves the step
        to the optimiser. ``trust_region_mode = "project"`` enforces the same ε exactly instead:
        after the optimiser's step the encoder is moved back to θ_old + t·Δθ with the largest t
        found that keeps the step's KL ≤ ε (:func:`project_step`; the decoder keeps its full step).
        ``credit = "token"`` (factorised encoders): each token's reward is the decoder
        log-likelihood of the pixels of its own patch, and each token gets its own proxy weights
        (docs/daps.md, "Per-token credit"). ``marginal_kl``: weight γ of L·KL(q̄ ‖ uniform) in the
        encoder's loss, q̄ the batch's mean code distribution over images and tokens
        (:func:`ngkit.methods.marginal_kl`): the part of the prior term that is code usage, without
        the part that makes codes forget the image; 0 (the paper) leaves it to β (docs/daps.md,
        "Keeping codes in use"). ``token_entropy``: weight γ_e of L·H̄, H̄ the mean entropy of the
        per-token distributions q(z_l|x) over the batch (a penalty that sharpens each image's codes);
        with ``token_entropy = marginal_kl = γ`` the two terms are −γ·L·I(x; z_l) + const, the
        information between an image and one token's code, the quantity LFQ maximises."""
        if self.factorised_only and encoder.autoregressive:
            raise ValueError(
                f'method "{self.name}" needs a factorised (non-autoregressive) encoder, but the '
                "encoder is autoregressive; set `[model.encoder] factorised = true` in the recipe, "
                'or use method "daps" for an autoregressive encoder'
            )
        if samples < 2:
            raise ValueError(f'method "{self.name}": samples (K) must be >= 2 to compare codes, got {samples}')
        if trust_region_mode not in ("penalty", "project"):
            raise ValueError(
                f'method "{self.name}": trust_region_mode must be "penalty" or "project", got {trust_region_mode!r}'
            )
        if credit not in ("sequence", "token", "first-order"):
            raise ValueError(
                f'method "{self.name}": credit must be "sequence", "token" or "first-order", got {credit!r}'
            )
        if credit != "sequence" and encoder.autoregressive:
            raise ValueError(
                f'method "{self.name}": credit = "{credit}" needs a factorised encoder (the per-token '
                "proxy is exact only when q(z|x) = prod_l q(z_l|x)); set `[model.encoder] factorised = "
                'true`, or credit = "sequence"'
            )
        if credit == "first-order" and not isinstance(getattr(step_size, "bound", None), float | int):
            raise ValueError(
                f'method "{self.name}": credit = "first-order" solves eta for a KL bound on all codes; '
                'set `[method.step_size] name = "kl"` (its bound, in nats per token, is used)'
            )
        if credit == "token" and type(decoder).pixel_log_prob is Decoder.pixel_log_prob:
            raise ValueError(
                f'method "{self.name}": credit = "token" needs the decoder\'s per-pixel log-likelihood, '
                f"but {type(decoder).__name__} has no pixel_log_prob; use the conv or mlp decoder, or "
                'credit = "sequence"'
            )
        super().__init__(encoder, decoder)
        self.beta = beta
        self.credit = credit
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
        if marginal_kl < 0:
            raise ValueError(f'method "{self.name}": marginal_kl must be >= 0, got {marginal_kl}')
        if token_entropy < 0:
            raise ValueError(f'method "{self.name}": token_entropy must be >= 0, got {token_entropy}')
        self.marginal_weight, self.entropy_weight = marginal_kl, token_entropy
        if first_order_curvature < 0:
            raise ValueError(f'method "{self.name}": first_order_curvature must be >= 0, got {first_order_curvature}')
        self.curvature = first_order_curvature
        if trust_region < 0:
            raise ValueError(f'method "{self.name}": trust_region must be >= 0 nats per image, got {trust_region}')
        penalty, project = trust_region > 0 and trust_region_mode == "penalty", trust_region > 0 and trust_region_mode == "project"
        self.trust = EncoderTrustRegion(trust_region, trust_region_lr, trust_region_init) if penalty else None
        self.project_bound = trust_region if project else 0.0
        # The encoder's parameters before the optimiser step (projection only): taken by the first
        # forward of a step, used and dropped by after_step; never alive between steps.
        self._theta_old: list[Tensor] | None = None

    def forward(self, x: Tensor, step: int) -> StepOutput:  # type: ignore[override]
        if self.one_pass:  # z [K, B, L] drawn without gradient, logq [K, B] with it
            z, enc = self.encoder.sample_log_prob(x, self.samples)
        else:
            z, _ = self.encoder.sample(x, self.samples)
            enc = self.encoder.log_prob(x, z)  # teacher-forced
        if self.project_bound > 0 and self._theta_old is None:
            self._theta_old = self._snapshot_encoder()
        self.splitter.observe(z)
        token_logq, logits = self._sampled(enc, z)
        self._step_batch = (x.detach(), z, logits.detach())
        if self.credit == "first-order":
            return self._first_order_step(x, z, enc, logits, step)
        if self.credit == "token":
            # Per token: reward r_l, log q_l(z_l|x) [K, B, L]; the proxy treats each (image, token)
            # as one column [K, B*L] (docs/daps.md, "Per-token credit").
            logp, reward = self._token_rewards(x, z)
            logq = token_logq if token_logq is not None else enc.logits.gather(-1, z.unsqueeze(-1)).squeeze(-1)
        else:
            logp, _ = self.decoder_log_prob(x, z)  # [K, B]
            reward, logq = logp.detach(), token_logq.sum(-1) if token_logq is not None else enc.logq
        k = reward.shape[0]
        reward_sg, logq_sg = reward.reshape(k, -1), logq.detach().reshape(k, -1)
        beta_schedule = float(self.beta(step))
        beta = beta_schedule * reward_scale(self.beta, reward_sg)

        eta = self.step_size.eta(reward_sg, logq_sg, beta)
        proxy = self.proxy(reward_sg, logq_sg, eta, beta)
        weights = proxy.weights.detach().float().view_as(logq)
        policy_loss = -(weights * logq.float()).sum(0).reshape(logq.shape[1], -1).sum(-1).mean()
        gen_loss = -logp.mean()
        loss = policy_loss + gen_loss
        self._last = (reward_sg, logq_sg, beta)
        trust_stats = self._trust_region_penalty(self.trust) if self.trust is not None else {}
        if trust_stats:
            loss = loss + trust_stats["tr_penalty"]
        usage_loss, usage_stats = self._usage_terms(logits)
        loss = loss + usage_loss

        adv = proxy.advantages
        stats = {
            "loss": loss,
            "policy_loss": policy_loss,
            "gen_loss": gen_loss,
            "eta": torch.as_tensor(eta),
            "ess": proxy.ess / self.samples,  # fraction of K
            "kl": proxy.kl,  # nats, sample estimate of KL(q~||q)
            "logp": logp.detach().mean(),
            "logq": enc.logq.detach().mean(),
            "entropy": enc.entropy.detach().mean(),  # nats per token
            "advantage_mean": adv.mean(),
            "advantage_std": adv.std(dim=0).mean(),  # spread over the K samples of an image
            "weight_max": proxy.weights.amax(dim=0).mean(),
        }
        stats.update(trust_stats)
        stats.update(usage_stats)
        logs = host_logs(stats)
        logs["beta"] = beta
        if beta != beta_schedule:
            logs["beta_schedule"] = beta_schedule
        return StepOutput(loss=loss, logs=logs)

    def _usage_terms(self, logits: Tensor) -> tuple[Tensor | float, dict[str, Tensor]]:
        """γ·L·KL(q̄ ‖ uniform) and γ_e·L·(mean per-token entropy) of ``logits`` (:meth:`_sampled`),
        per image like the policy loss's sum over the L tokens; each only when its weight is > 0."""
        loss: Tensor | float = 0.0
        stats: dict[str, Tensor] = {}
        if self.marginal_weight > 0:
            usage = code_marginal_kl(logits)
            loss = loss + self.marginal_weight * self.latent.tokens * usage
            stats["marginal_kl"] = usage.detach()
        if self.entropy_weight > 0:
            token_logits = logits.float()
            mean_entropy = -(token_logits.exp() * token_logits).sum(-1).mean()
            loss = loss + self.entropy_weight * self.latent.tokens * mean_entropy
        return loss, stats

    def _first_order_step(self, x: Tensor, z: Tensor, enc: TokenLogProb, logits: Tensor, step: int) -> StepOutput:
        """``credit = "first-order"``: every code of every token scored by the decoder's gradient
        at the K samples, the proxy on all V codes, the encoder fitted by cross-entropy to it
        (:mod:`ngkit_plugins.daps_first_order`). The decoder's loss is DAPS's, −mean log p."""
        logp, reward = first_order_rewards(
            self.decoder_log_prob, self.decoder, x, z, self.latent.codes, self.curvature
        )  # [K, B], [B, L, V]
        beta = float(self.beta(step))
        logq = logits[0]  # [B, L, V] log-probabilities, with gradient
        log_target, eta, kl = dense_token_proxy(logq, reward, float(self.step_size.bound), beta)
        target = log_target.exp().float()
        policy_loss = -(target * logq.float()).sum(-1).sum(-1).mean()
        gen_loss = -logp.mean()
        usage_loss, usage_stats = self._usage_terms(logits)
        loss = policy_loss + gen_loss + usage_loss
        trust_stats = self._trust_region_penalty(self.trust) if self.trust is not None else {}
        if trust_stats:
            loss = loss + trust_stats["tr_penalty"]
        centred = reward - (logq.detach().exp() * reward).sum(-1, keepdim=True)  # E_q-centred r^
        stats = {
            "loss": loss,
            "policy_loss": policy_loss,
            "gen_loss": gen_loss,
            "eta": eta,
            "kl": kl,  # nats per token, exact KL(q~_l || q_l) averaged over images and tokens
            "logp": logp.detach().mean(),
            "logq": enc.logq.detach().mean(),
            "entropy": enc.entropy.detach().mean(),
            "advantage_std": centred.std(-1).mean(),  # spread of r^ over the V codes
            "weight_max": target.amax(-1).mean(),  # the proxy's largest code probability
            **usage_stats,
            **trust_stats,
        }
        logs = host_logs(stats)
        logs["beta"] = beta
        return StepOutput(loss=loss, logs=logs)

    def _token_rewards(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """log p(x|z) ``[K, B]`` with gradient, and each token's reward ``[K, B, L]`` without: the
        log-likelihood of the pixels its patch covers (the two agree: Σ_l r_l = log p)."""
        k, b = z.shape[0], z.shape[1]
        params = self.decoder(self.decoder.embed(z.flatten(0, 1)))
        x_rep = x.unsqueeze(0).expand(k, *x.shape).flatten(0, 1)
        pixels = self.decoder.pixel_log_prob(x_rep, params)  # [K*B, C, H, W]
        logp = pixels.flatten(1).sum(-1).view(k, b)
        return logp, patch_rewards(pixels.detach(), self.latent.grid).view(k, b, -1)

    @property
    def post_step_pass(self) -> bool:  # type: ignore[override]
        """The projection measures the step's KL after the optimiser step (ngkit bench's floor)."""
        return self.project_bound > 0

    def _snapshot_encoder(self) -> list[Tensor]:
        """θ_old for the projection: copies of the encoder's parameters before the optimiser step.
        Refused where the optimiser does not step these tensors themselves (ZeRO 1-3 partitions,
        bf16/fp16 master weights): moving them back would be undone by the next step."""
        params = list(self.encoder.parameters())
        if any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in params):
            raise TrainingError(
                f'method "{self.name}": trust_region_mode = "project" needs the optimiser to step the '
                "model's own parameters, i.e. [distributed] zero_stage = 0 and precision = \"fp32\" (the "
                "defaults); this run's parameters are partitioned by ZeRO or held as bf16/fp16 copies "
                'of fp32 master weights. Use those settings, or trust_region_mode = "penalty"'
            )
        return [p.detach().clone() for p in params]

    def _kl_view(self, logits: Tensor) -> Tensor:
        """The logits KL(q_old ‖ q_new) needs: a factorised encoder's are the same for all K
        samples, so one copy gives the exact KL; an autoregressive encoder's depend on z."""
        return logits if self.encoder.autoregressive else logits[:1]

    def _sampled(self, enc: TokenLogProb, z: Tensor) -> tuple[Tensor | None, Tensor]:
        """Per-token log q of the K samples ``[K, B, L]`` with gradient (None: use the encoder's
        own), and the logits the rest of the step reads: :meth:`_kl_view`'s, as one copy
        ``[1, B, L, V]`` where a factorised encoder's K copies are expand views of one tensor
        (the transformer's are). Then log q is gathered from that copy (:class:`_SampledLogProbs`)
        and nothing here makes a ``[K, B, L, V]`` tensor, forward or backward; the losses and
        gradients are those of the K copies, bit for bit."""
        one = None if self.encoder.autoregressive else _one_copy(enc.logits)
        if one is None:
            return None, self._kl_view(enc.logits)
        if self.credit == "first-order":  # reads every code, not the samples'
            return None, one.unsqueeze(0)
        token_logq, one = _SampledLogProbs.apply(one, z)
        return token_logq, one.unsqueeze(0)

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
        if self._last is None and self._step_batch is None:
            return {}
        logs: dict[str, float] = {}
        if self._last is not None:  # credit = "first-order" solves its own η: no policy update
            logp, logq, beta = self._last
            self._last = None
            logs = self.step_size.update(logp, logq, beta)
        logs.update(self._measure_step())
        return {**logs, **self.splitter.maybe_split(step, self.encoder, self.decoder)}

    @torch.no_grad()
    def _measure_step(self) -> dict[str, float]:
        """``encoder_kl``: mean over the last batch of KL(q_old(·|x) ‖ q_new(·|x)) across the
        optimiser step just taken (exact if factorised, sampled along z ~ q_old if
        autoregressive). With the penalty it also takes the dual step on α; with the projection
        it first moves the encoder back inside the bound (``encoder_kl_raw`` before, ``tr_t``)."""
        if self._step_batch is None:
            return {}
        x, z, old_logits = self._step_batch
        self._step_batch = None
        if self.trust is None and self.project_bound == 0 and not logs_read():
            return {}  # only a log here, and this step's logs are not read: no encoder pass

        def kl_now() -> Tensor:
            return token_kl(old_logits, self.encoder.log_prob(x, self._kl_codes(z)).logits).mean()

        if self.project_bound > 0 and self._theta_old is not None:
            old, self._theta_old = self._theta_old, None
            done = project_step(list(self.encoder.parameters()), old, kl_now, self.project_bound)
            return {"encoder_kl": done.kl, "encoder_kl_raw": done.kl_raw, "tr_t": done.t}
        kl = kl_now()
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


def _one_copy(logits: Tensor) -> Tensor | None:
    """The ``[B, L, V]`` tensor that ``logits [K, B, L, V]`` are K expand views of, or None."""
    one = logits._base
    if one is None or logits.stride(0) != 0 or one.shape != logits.shape[1:] or one.stride() != logits.stride()[1:]:
        return None
    return one


class _SampledLogProbs(torch.autograd.Function):
    """``(token_logq, copy) = apply(one, z)``: the K samples' log-probs ``one[b, l, z[k, b, l]]``
    ``[K, B, L]``, and a copy of ``one [B, L, V]`` for everything else the loss reads from the K
    copies. Backward: the gradient that reached the copy, then each sample's gradient added at its
    code in sample order k = 0..K-1. That is the order in which autograd summed them when the K
    copies were ``one.expand(K, ...)``: the gather's ``[K, B, L, V]`` gradient was added to the
    buffer that held the copy's at k = 0 (the gather, made first, runs last in backward), and the
    expand's sum over K added the K slices in order, with exact zeros where a sample drew another
    code. torch's outer-dimension sum adds in order on one thread for K <= 16 when B*L*V is a
    multiple of 64 (its tail columns and per-thread chunks use 4 interleaved accumulators); there
    the two agree bit for bit (tests/test_step_cost.py), elsewhere by reassociation only."""

    @staticmethod
    def forward(ctx: Any, one: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        index = z.permute(1, 2, 0)  # [B, L, K]
        ctx.save_for_backward(index)
        ctx.set_materialize_grads(False)
        ctx.codes = one.shape[-1]
        return one.gather(-1, index).permute(2, 0, 1).contiguous(), one.clone()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_logq: Tensor | None, grad_one: Tensor | None
    ) -> tuple[Tensor | None, None]:
        (index,) = ctx.saved_tensors
        if grad_logq is None:
            return grad_one, None
        grad = grad_one.clone() if grad_one is not None else grad_logq.new_zeros((*index.shape[:2], ctx.codes))
        return grad.scatter_add_(-1, index, grad_logq.permute(1, 2, 0)), None


class DapsNA(Daps):
    """DAPS-NA: the same update, checked to run on a factorised encoder q(z|x) = Π_l q(z_l|x)."""

    name = "daps-na"
    factorised_only = True


@hookimpl
def register_methods(register: Register) -> None:
    register("daps", Daps)
    register("daps-na", DapsNA)
