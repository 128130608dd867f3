"""Decoder ``"conv"``: the DAPS paper's ResNet p(x|z) with a per-pixel Gaussian.

Token embeddings on the latent grid -> 3x3 conv -> residual blocks -> stride-2 transposed convs
(each doubles a side) -> mean and log-variance per pixel, on pixels standardised with the
dataset's per-channel mean and std. Layer layout follows the authors' ``ResNetDecoder`` (jadex
``networks/resnet.py``).

The grid need not be square: each side is doubled as often as it needs (a side that is done
keeps its size, stride 1). Where image side / grid side is not a power of two (28 x 28 from a
4 x 2 grid of 7 x 14 patches), the embedded grid is first resized (bilinear) to the image
divided by its largest power of two, e.g. 7 x 7, then doubled to 28 x 28.

Also home of :class:`CodeEmbedding` and :class:`CodeTableDecoder`, which the built-in ``"mlp"``
decoder reuses (same-package internals of ``ngkit_plugins``, not ngkit's plugin API).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngkit import hookimpl
from ngkit.components import Decoder, ImageSpec, LatentSpec, Register, pixel_stats

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")

LOG_2PI = math.log(2 * math.pi)
MIN_VAR, MAX_VAR = 0.01, 1.0  # variance clip in standardised units (DAPS paper, decoder)


class CodeTableDecoder(Decoder):
    """A decoder whose input is a :class:`CodeEmbedding` table at ``self.embedding``."""

    embedding: CodeEmbedding

    def split_codes(self, dst: Tensor, src: Tensor, noise: float, generator: torch.Generator) -> None:
        self.embedding.split(dst, src, noise, generator)

    def embed(self, z: Tensor) -> Tensor:
        return self.embedding(z)


class ConvDecoder(CodeTableDecoder):
    """Gaussian ResNet decoder; ``likelihood = "fixed"`` uses a constant std instead of a
    predicted variance (then ``forward`` returns only the mean)."""

    def __init__(
        self,
        *,
        image: ImageSpec,
        latent: LatentSpec,
        width: int = 64,
        embed_dim: int = 128,
        res_blocks: int = 2,
        likelihood: Literal["gaussian", "fixed"] = "gaussian",
        fixed_std: float = 1.0,
        batch_norm: bool = True,
        code_digits: int = 1,
    ) -> None:
        super().__init__()
        if likelihood not in ("gaussian", "fixed"):
            raise ValueError(f'conv decoder: likelihood must be "gaussian" or "fixed", got "{likelihood}"')
        if not (fixed_std > 0 and math.isfinite(fixed_std)):
            raise ValueError(f"conv decoder: fixed_std must be a positive finite number, got {fixed_std}")
        for option, value, least in (("width", width, 1), ("embed_dim", embed_dim, 1), ("res_blocks", res_blocks, 0)):
            if value < least:
                raise ValueError(f"conv decoder: {option} must be at least {least}, got {value}")
        self.resize, strides = _upsampling(image, latent)
        self.image, self.latent = image, latent
        self.embed_dim = embed_dim
        self.likelihood = likelihood
        self.fixed_logvar = 2 * math.log(fixed_std)
        mean, std = pixel_stats(image)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

        self.embedding = CodeEmbedding(latent.codes, embed_dim, code_digits)
        out_channels = image.channels * (2 if likelihood == "gaussian" else 1)
        layers: list[nn.Module] = [nn.Conv2d(embed_dim, width, 3, padding=1)]
        layers += [_ResBlock(width, batch_norm) for _ in range(res_blocks)]
        layers.append(nn.ReLU())
        channels = width
        for i, stride in enumerate(strides):
            last = i == len(strides) - 1
            nxt = out_channels if last else max(channels // 2, out_channels)
            # per side: kernel 4, stride 2, padding 1 exactly doubles; kernel 3, stride 1 keeps
            kernel = tuple(4 if s == 2 else 3 for s in stride)
            bias = last or not batch_norm
            layers.append(nn.ConvTranspose2d(channels, nxt, kernel, stride=stride, padding=1, bias=bias))
            if not last:
                layers += [_norm(nxt, batch_norm), nn.ReLU()]
            channels = nxt
        self.net = nn.Sequential(*layers)

    def forward(self, h: Tensor) -> Tensor:
        """``h [B, L, embed_dim]`` -> ``[B, 2C, H, W]`` (mean, log-variance) or ``[B, C, H, W]``."""
        b, _, e = h.shape
        grid = h.transpose(1, 2).reshape(b, e, *self.latent.grid)
        if self.resize is not None:
            grid = F.interpolate(grid, size=self.resize, mode="bilinear", align_corners=False)
        return self.net(grid)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """Gaussian log density of the standardised image, summed over pixels (nats, ``[B]``).

        Standardising shifts the density by the constant -sum(log std) per image relative to [0, 1]
        pixel units; it does not change gradients or the ranking of samples.
        """
        return self.pixel_log_prob(x, params).flatten(1).sum(-1)

    def pixel_log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """The Gaussian log density of each standardised pixel, ``[B, C, H, W]`` (nats)."""
        mu, logvar = self._mean_logvar(params)
        xs = (x - self.pixel_mean) / self.pixel_std
        return -0.5 * (LOG_2PI + logvar + (xs - mu) ** 2 * torch.exp(-logvar))

    def mean(self, params: Tensor) -> Tensor:
        mu, _ = self._mean_logvar(params)
        return (mu * self.pixel_std + self.pixel_mean).clamp(0, 1)

    def _mean_logvar(self, params: Tensor) -> tuple[Tensor, Tensor]:
        if self.likelihood == "fixed":
            return params, params.new_full((), self.fixed_logvar)
        mu, logvar = params.chunk(2, dim=1)
        return mu, logvar.clamp(math.log(MIN_VAR), math.log(MAX_VAR))


class CodeEmbedding(nn.Module):
    """Codes ``[..., L]`` (long) or soft one-hots ``[..., L, V]`` -> ``[..., L, dim]`` through one
    table, so relaxed (Gumbel) and discrete codes land in the same space.

    ``digits > 1`` builds the table from shared parts: code c, written in base b = ceil(V^(1/d))
    with d digits, embeds as the sum of one learned vector per digit. A code the encoder rarely
    picks then still decodes sensibly from parts trained by other codes (with d = 1 every code
    has its own row, trained only when it is drawn).
    """

    def __init__(self, codes: int, dim: int, digits: int = 1) -> None:
        super().__init__()
        if digits < 1:
            raise ValueError(f"code embedding: digits must be >= 1, got {digits}")
        self.codes, self.digits = codes, digits
        if digits == 1:
            self.weight = nn.Parameter(torch.randn(codes, dim))  # N(0, 1), nn.Embedding's default
            return
        base = math.ceil(codes ** (1 / digits) - 1e-9)
        place = base ** torch.arange(digits)
        self.register_buffer("code_digits", torch.arange(codes)[:, None] // place % base, persistent=False)
        # Sum of d unit-variance parts / sqrt(d): the table keeps N(0, 1) entries.
        self.parts = nn.Parameter(torch.randn(digits, base, dim) / math.sqrt(digits))

    def table(self) -> Tensor:
        if self.digits == 1:
            return self.weight
        return self.parts[torch.arange(self.digits, device=self.parts.device), self.code_digits].sum(1)

    def forward(self, z: Tensor) -> Tensor:
        table = self.table()
        return z @ table if z.is_floating_point() else F.embedding(z, table)

    @torch.no_grad()
    def split(self, dst: Tensor, src: Tensor, noise: float, generator: torch.Generator) -> None:
        """Rows ``dst`` become rows ``src`` plus noise of ``noise`` times their RMS."""
        if self.digits > 1:
            raise ValueError("splitting codes needs one embedding row per code: use digits = 1")
        dst, src = dst.to(self.weight.device), src.to(self.weight.device)
        rows = self.weight[src]
        jitter = torch.randn(rows.shape, generator=generator).to(rows) * rows.pow(2).mean(-1, keepdim=True).sqrt()
        self.weight[dst] = rows + noise * jitter


class _ResBlock(nn.Module):
    """x + BN(conv1x1(relu(BN(conv3x3(relu(x)))))), as in the authors' ResidualBlocks."""

    def __init__(self, width: int, batch_norm: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=not batch_norm),
            _norm(width, batch_norm),
            nn.ReLU(),
            nn.Conv2d(width, width, 1, bias=not batch_norm),
            _norm(width, batch_norm),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _norm(channels: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


def _upsampling(image: ImageSpec, latent: LatentSpec) -> tuple[tuple[int, int] | None, list[tuple[int, int]]]:
    """The size to resize the grid to first (None: no resize) and the (row, column) strides of
    each transposed conv that follows: each side doubles until it reaches the image."""
    sides = []
    for side, cells in ((image.height, latent.grid[0]), (image.width, latent.grid[1])):
        factor = side // cells
        if side == cells * factor and factor & (factor - 1) == 0:
            sides.append((cells, factor.bit_length() - 1))  # an exact power of two: no resize
            continue
        doublings = (side & -side).bit_length() - 1  # the largest power of two dividing the side
        while side >> doublings < cells:
            doublings -= 1
        sides.append((side >> doublings, doublings))
    (rows, row_doublings), (cols, col_doublings) = sides
    stages = max(row_doublings, col_doublings)
    if stages == 0:
        raise ValueError(
            f"conv decoder: cannot upsample the {latent.grid[0]}x{latent.grid[1]} latent grid to the "
            f"{image.height}x{image.width} image by doubling (no image side is even and larger than the "
            "grid); use larger patches or the mlp decoder"
        )
    resize = None if (rows, cols) == latent.grid else (rows, cols)
    return resize, [(2 if i < row_doublings else 1, 2 if i < col_doublings else 1) for i in range(stages)]


@hookimpl
def register_decoders(register: Register) -> None:
    register("conv", ConvDecoder)
