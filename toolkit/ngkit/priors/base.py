"""What every prior over a tokenizer's codes is: a class-conditional generative model of
``[B, L]`` code sequences, trained by the engine through :class:`ngkit.priors.trainer.PriorMethod`.

Labels are ``0 .. classes-1``; the extra label ``classes`` is the *null* label: what label dropout
trains and what classifier-free guidance contrasts with (an unlabelled dataset has ``classes = 0``
and only the null label). ``allowed`` marks the codes the tokenizer can emit; the others are
never sampled.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngkit.components import LatentSpec, StepOutput
from ngkit.nn import attention


class Prior(nn.Module):
    """Base class of registered priors (``register_priors``)."""

    latent: LatentSpec
    classes: int

    def __init__(self, latent: LatentSpec, classes: int) -> None:
        super().__init__()
        self.latent, self.classes = latent, classes
        self.register_buffer("allowed", torch.ones(latent.codes, dtype=torch.bool))

    def loss(self, codes: Tensor, labels: Tensor) -> StepOutput:
        """Training loss for codes ``[B, L]`` (long) with labels ``[B]`` (long; ``classes`` = none)."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, labels: Tensor, *, guidance: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Codes ``[N, L]`` for labels ``[N]``; ``guidance`` 1 is the conditional model, 0 the
        unconditional one, above 1 classifier-free guidance."""
        raise NotImplementedError

    def null_labels(self, labels: Tensor) -> Tensor:
        return torch.full_like(labels, self.classes)

    def drop_labels(self, labels: Tensor, rate: float) -> Tensor:
        """Labels replaced by the null label with probability ``rate`` (trains the unconditional model)."""
        if rate <= 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < rate
        return torch.where(drop, self.null_labels(labels), labels)

    def mask_logits(self, logits: Tensor) -> Tensor:
        """Logits ``[..., V]`` with the codes the tokenizer cannot emit set to -inf."""
        return logits.masked_fill(~self.allowed, float("-inf"))


def guided(conditional: Tensor, unconditional: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance on log-probabilities: u + s (c - u). ``torch.lerp`` computes it as
    c - (1 - s)(c - u) for s >= 0.5, so scale 1 returns the conditional values exactly."""
    return torch.lerp(unconditional, conditional, scale)


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Temperature, then keep the ``top_k`` most likely codes (0: all) and the smallest set whose
    probability reaches ``top_p`` (1: all); the rest get -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        mass_before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """One code per row of ``logits [..., V]`` by inverse CDF with one uniform per row, so that two
    computations of (nearly) the same logits draw the same codes from the same generator."""
    probs = logits.float().softmax(-1)
    u = torch.rand(probs.shape[:-1], generator=generator, device=probs.device).unsqueeze(-1)
    index = (probs.cumsum(-1) < u * probs.sum(-1, keepdim=True)).sum(-1)
    # round-off can push the index past the last code with mass: take the last allowed one
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).long().argmax(-1)
    return torch.minimum(index, last)


class Block(nn.Module):
    """Pre-LN transformer block; ``forward`` optionally attends to cached keys/values."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"prior transformer: width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, h: Tensor, causal: bool = False, cache: dict[str, Tensor] | None = None) -> Tensor:
        """``h [B, M, width]``; with ``cache`` (a dict, filled in place) the M new positions
        attend to every cached position and themselves (M = 1 when decoding)."""
        b, m, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, m, 3, self.heads, w // self.heads).unbind(2)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 1), torch.cat([cache["v"], v], 1)
            cache["k"], cache["v"] = k, v
            causal = causal and q.shape[1] == k.shape[1]
        h = h + self.proj(attention(q, k, v, causal=causal).reshape(b, m, w))
        return h + self.mlp(self.norm2(h))


def time_embedding(t: Tensor, width: int) -> Tensor:
    """Sinusoidal features ``[B, width]`` of times ``t [B]`` in [0, 1] (t scaled by 1000 as in
    diffusion models, frequencies 1 .. 1/10000)."""
    half = width // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return F.pad(torch.cat([angles.sin(), angles.cos()], -1), (0, width - 2 * half))
