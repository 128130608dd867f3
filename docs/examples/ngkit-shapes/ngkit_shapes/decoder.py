"""Decoder ``patch-bernoulli``: each token's embedding -> the logits of its patch's pixels.

Likelihood: a continuous Bernoulli would be exact for pixels in [0, 1]; this example uses the
plain Bernoulli cross-entropy, log p(x|z) = sum x log s + (1 - x) log(1 - s), which is a proper
log-likelihood only for binary pixels (the shapes are nearly so). Summed over pixels, in nats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngkit import hookimpl
from ngkit.components import Decoder, ImageSpec, LatentSpec

NGKIT_PLUGIN_API = 3  # the ngkit plugin API this module was written for


class PatchBernoulli(Decoder):
    def __init__(self, *, image: ImageSpec, latent: LatentSpec, embed_dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        rows, cols = latent.grid
        if image.height % rows or image.width % cols:
            raise ValueError(f"patch-bernoulli: the {rows}x{cols} grid does not divide {image.height}x{image.width}")
        self.image, self.latent, self.embed_dim = image, latent, embed_dim
        self.patch = (image.height // rows, image.width // cols)
        self.table = nn.Parameter(torch.randn(latent.codes, embed_dim) * 0.1)
        self.net = nn.Sequential(
            nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, image.channels * self.patch[0] * self.patch[1])
        )

    def embed(self, z: Tensor) -> Tensor:
        """Codes ``[..., L]`` index the table; soft one-hots ``[..., L, V]`` mix its rows."""
        return self.table[z] if z.dtype == torch.long else z @ self.table

    def forward(self, h: Tensor) -> Tensor:
        """``h [B, L, embed_dim]`` -> pixel logits ``[B, C, H, W]``."""
        b = h.shape[0]
        (rows, cols), (ph, pw), c = self.latent.grid, self.patch, self.image.channels
        patches = self.net(h).view(b, rows, cols, c, ph, pw)
        return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, c, rows * ph, cols * pw)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        return -F.binary_cross_entropy_with_logits(params, x, reduction="none").flatten(1).sum(-1)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)

    def split_codes(self, dst: Tensor, src: Tensor, noise: float, generator: torch.Generator) -> None:
        with torch.no_grad():
            rows = self.table[src]
            jitter = torch.randn(rows.shape, generator=generator).to(rows) * noise * rows.norm(dim=-1, keepdim=True)
            self.table[dst] = rows + jitter


@hookimpl
def register_decoders(register) -> None:
    register("patch-bernoulli", PatchBernoulli)
