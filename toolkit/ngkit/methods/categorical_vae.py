"""Shared base for methods whose encoder is a categorical q(z|x) over codes (DAPS, Gumbel,
REINFORCE, PPO). Public API (:mod:`ngkit.methods`): the method plugins subclass it."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ngkit.components import Decoder, Encoder, Method
from ngkit.distributed import sum_over_ranks


class CategoricalVAE(Method):
    """Encoder + decoder with the evaluation helpers every categorical method shares."""

    can_sample = True  # q(z|x) is a distribution over codes: sample_codes draws from it

    def __init__(self, encoder: Encoder, decoder: Decoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.latent = encoder.latent

    def decoder_log_prob(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """log p(x|z) for codes ``z [K, B, L]`` (or soft one-hots ``[K, B, L, V]``) -> ``[K, B]``,
        and the likelihood parameters for the K*B decoded images."""
        k, b = z.shape[0], z.shape[1]
        params = self.decoder(self.decoder.embed(z.flatten(0, 1)))
        x_rep = x.unsqueeze(0).expand(k, *x.shape).flatten(0, 1)
        return self.decoder.log_prob(x_rep, params).view(k, b), params

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return self.encoder.mode(x)

    @torch.no_grad()
    def sample_codes(self, x: Tensor) -> Tensor:
        """One z ~ q(z|x) per image ``[B, L]``: the codes the DAPS reference code evaluates
        (``ngkit eval --codes sample``), beside ``encode``'s argmax."""
        return self.encoder.sample(x, 1)[0][0]

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.decoder.mean(self.decoder(self.decoder.embed(z)))

    @torch.no_grad()
    def beta_elbo(self, x: Tensor, beta: float) -> Tensor:
        """One-sample estimate of E_q[log p(x|z)] - beta * KL(q(z|x) || uniform) per image.

        KL(q || uniform) = L log V - H(q); the per-token conditional entropies along a sampled
        sequence are an unbiased estimate of H(q) for an autoregressive q (exact if factorised).
        """
        z, _ = self.encoder.sample(x, 1)
        entropy = self.encoder.log_prob(x, z[0]).entropy.sum(-1)
        logp, _ = self.decoder_log_prob(x, z)
        kl = self.latent.tokens * math.log(self.latent.codes) - entropy
        return logp[0] - beta * kl


class DeadCodeSplitter(nn.Module):
    """Revives codes the encoder has all but stopped using: every ``every`` steps, each code
    drawn less than ``below`` times its uniform share (1/V of all draws) since the last check
    takes over part of a used code (chosen in proportion to use), in encoder and decoder alike
    (:meth:`Encoder.split_codes`, :meth:`Decoder.split_codes`).

    The split keeps q(z|x) and the decoder's output unchanged up to ``noise`` (and the mass
    the revived codes had), so training does not jump; the noise lets the copies specialise,
    as when k-means splits a cluster. Counts are summed over ranks and the random choices are
    seeded by the step, so every rank makes the same split.
    """

    def __init__(self, codes: int, every: int, noise: float, below: float) -> None:
        super().__init__()
        self.every, self.noise, self.below = every, noise, below
        # This rank's draws per code since the last check: kept in the rank's checkpoint file
        # (get_rank_state), not the module's, whose one copy is rank 0's.
        self.register_buffer("counts", torch.zeros(codes, dtype=torch.float64), persistent=False)

    def get_rank_state(self) -> dict[str, Tensor]:
        return {"counts": self.counts.double().cpu()}

    def set_rank_state(self, state: dict[str, Tensor]) -> None:
        self.counts.copy_(state["counts"])

    @torch.no_grad()
    def observe(self, z: Tensor) -> None:
        if self.every > 0:
            self.counts += torch.bincount(z.flatten(), minlength=self.counts.numel()).to(self.counts)

    @torch.no_grad()
    def maybe_split(self, step: int, encoder: Encoder, decoder: Decoder) -> dict[str, float]:
        if self.every <= 0 or step % self.every:
            return {}
        counts = sum_over_ranks(self.counts).cpu().clone()
        self.counts.zero_()
        share = counts / counts.sum().clamp_min(1) * counts.numel()  # 1.0 = uniform use
        dead = (share < self.below).nonzero().flatten()
        if dead.numel() == 0 or dead.numel() == counts.numel():
            return {"codes_split": 0.0}
        live = torch.where(share < self.below, torch.zeros_like(counts), counts)
        generator = torch.Generator().manual_seed(step)
        src = torch.multinomial(live, dead.numel(), replacement=True, generator=generator)
        encoder.split_codes(dead, src)
        decoder.split_codes(dead, src, self.noise, generator)
        return {"codes_split": float(dead.numel())}
