"""Decoder ``"mlp"``: an MLP over the flattened token embeddings with a Bernoulli likelihood
per pixel (the DAPS paper's MNIST decoder).

Pixels in [0, 1] are the Bernoulli targets (the usual MNIST-VAE binary cross-entropy); this is
not the continuous Bernoulli, so log p is not a normalised density for grey pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngkit import hookimpl
from ngkit.components import ImageSpec, LatentSpec, Register
from ngkit_plugins.conv_decoder import CodeEmbedding, CodeTableDecoder

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")


class MlpDecoder(CodeTableDecoder):
    """``layers`` hidden ReLU layers of ``hidden`` units; ``forward`` returns pixel logits."""

    def __init__(
        self,
        *,
        image: ImageSpec,
        latent: LatentSpec,
        hidden: int = 512,
        layers: int = 2,
        embed_dim: int = 64,
        code_digits: int = 1,
    ) -> None:
        super().__init__()
        for option, value, least in (("hidden", hidden, 1), ("layers", layers, 0), ("embed_dim", embed_dim, 1)):
            if value < least:
                raise ValueError(f"mlp decoder: {option} must be at least {least}, got {value}")
        self.image = image
        self.embed_dim = embed_dim
        self.embedding = CodeEmbedding(latent.codes, embed_dim, code_digits)
        net: list[nn.Module] = []
        size = latent.tokens * embed_dim
        for _ in range(layers):
            net += [nn.Linear(size, hidden), nn.ReLU()]
            size = hidden
        net.append(nn.Linear(size, image.num_pixels))
        self.net = nn.Sequential(*net)

    def forward(self, h: Tensor) -> Tensor:
        """``h [B, L, embed_dim]`` -> Bernoulli logits ``[B, C, H, W]``."""
        return self.net(h.flatten(1)).view(h.shape[0], *self.image.shape)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """sum over pixels of x log p + (1 - x) log(1 - p), p = sigmoid(logits) (nats, ``[B]``)."""
        return self.pixel_log_prob(x, params).flatten(1).sum(-1)

    def pixel_log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """The Bernoulli log-likelihood of each pixel, ``[B, C, H, W]`` (nats)."""
        return -F.binary_cross_entropy_with_logits(params, x, reduction="none")

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)


@hookimpl
def register_decoders(register: Register) -> None:
    register("mlp", MlpDecoder)
