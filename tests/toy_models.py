"""Tiny encoder/decoder satisfying ngkit's contracts, for method tests that must not depend on
the transformer's cost. Factorised categorical q(z|x) from a linear map; Gaussian decoder with
unit variance on raw pixels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngkit.components import Decoder, Encoder, ImageSpec, LatentSpec, TokenLogProb


class ToyEncoder(Encoder):
    autoregressive = False

    def __init__(self, image: ImageSpec, latent: LatentSpec, feature_dim: int = 8) -> None:
        super().__init__()
        self.latent = latent
        self.feature_dim = feature_dim
        self.net = nn.Linear(image.num_pixels, latent.tokens * feature_dim)
        self.head = nn.Linear(feature_dim, latent.codes)

    def features(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1)).view(x.shape[0], self.latent.tokens, self.feature_dim)

    def _logits(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.head(torch.tanh(self.features(x))), dim=-1)

    def log_prob(self, x: Tensor, z: Tensor) -> TokenLogProb:
        logits = self._logits(x).expand(*z.shape, self.latent.codes)
        token_lp = logits.gather(-1, z.unsqueeze(-1)).squeeze(-1)
        entropy = -(logits.exp() * logits).sum(-1)
        return TokenLogProb(token_lp.sum(-1), logits, entropy)

    @torch.no_grad()
    def sample(self, x: Tensor, num_samples: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        logits = self._logits(x)
        z = torch.distributions.Categorical(logits=logits / temperature).sample((num_samples,))
        return z, self.log_prob(x, z).logq

    @torch.no_grad()
    def mode(self, x: Tensor) -> Tensor:
        return self._logits(x).argmax(-1)

    def relaxed_sample(self, x: Tensor, temperature: float, hard: bool) -> tuple[Tensor, Tensor]:
        logits = self._logits(x)
        return F.gumbel_softmax(logits, tau=temperature, hard=hard), logits


class ToyDecoder(Decoder):
    def __init__(self, image: ImageSpec, latent: LatentSpec, embed_dim: int = 8) -> None:
        super().__init__()
        self.image = image
        self.embed_dim = embed_dim
        self.codebook = nn.Embedding(latent.codes, embed_dim)
        self.out = nn.Linear(latent.tokens * embed_dim, image.num_pixels)

    def embed(self, z: Tensor) -> Tensor:
        if z.is_floating_point():
            return z @ self.codebook.weight
        return self.codebook(z)

    def forward(self, h: Tensor) -> Tensor:
        return self.out(h.flatten(1)).view(h.shape[0], *self.image.shape)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        return (-0.5 * (x - params) ** 2 - 0.5 * math.log(2 * math.pi)).flatten(1).sum(-1)

    def mean(self, params: Tensor) -> Tensor:
        return params.clamp(0, 1)


def toy_pair(channels: int = 1, size: int = 4, tokens: int = 2, codes: int = 3) -> tuple[ToyEncoder, ToyDecoder]:
    image = ImageSpec(channels, size, size)
    latent = LatentSpec((1, tokens), codes)
    return ToyEncoder(image, latent), ToyDecoder(image, latent)
