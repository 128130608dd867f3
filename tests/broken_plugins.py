"""A plugin whose components break their contracts, to test that ngkit names it when they do.

``flat-decoder`` returns one value per image and channel (the reconstruction broadcasts over the
pixels), ``short-logits-encoder`` drops a code from its logits, ``exploding-decoder`` raises in
its forward during training only (so it passes the build-time check). ``value-reading-decoder``
keeps its contracts but reads a weight in its constructor, which the meta device cannot do.
"""

from __future__ import annotations

from torch import Tensor

from ngkit import hookimpl
from ngkit.components import ImageSpec, LatentSpec, Register, TokenLogProb
from ngkit_plugins.conv_decoder import ConvDecoder
from ngkit_plugins.transformer_encoder import TransformerEncoder


class FlatDecoder(ConvDecoder):
    def forward(self, h: Tensor) -> Tensor:
        return super().forward(h).mean((2, 3), keepdim=True)


class ExplodingDecoder(ConvDecoder):
    def forward(self, h: Tensor) -> Tensor:
        if self.training:
            raise RuntimeError("decoder exploded")
        return super().forward(h)


class ValueReadingDecoder(ConvDecoder):
    def __init__(self, *, image: ImageSpec, latent: LatentSpec, width: int = 16, embed_dim: int = 16) -> None:
        super().__init__(image=image, latent=latent, width=width, embed_dim=embed_dim)
        self.init_rms = float(self.embedding.weight.pow(2).mean().sqrt())


class ShortLogitsEncoder(TransformerEncoder):
    def log_prob(self, x: Tensor, z: Tensor) -> TokenLogProb:
        out = super().log_prob(x, z)
        return TokenLogProb(out.logq, out.logits[..., :-1], out.entropy)


@hookimpl
def register_decoders(register: Register) -> None:
    register("flat-decoder", FlatDecoder)
    register("exploding-decoder", ExplodingDecoder)
    register("value-reading-decoder", ValueReadingDecoder)


@hookimpl
def register_encoders(register: Register) -> None:
    register("short-logits-encoder", ShortLogitsEncoder)
