"""Shared base for methods whose encoder is a categorical q(z|x) over codes (DAPS, Gumbel,
REINFORCE, PPO). Not a plugin: the method plugins subclass it."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ngkit.components import Decoder, Encoder, Method


class CategoricalVAE(Method):
    """Encoder + decoder with the evaluation helpers every categorical method shares."""

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
