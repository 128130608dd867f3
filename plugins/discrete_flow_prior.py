"""Prior ``"discrete-flow"``: class-conditional discrete flow matching over a tokenizer's codes.

Path (Gat et al. 2024, "Discrete Flow Matching", with the linear schedule κ_t = t): at time t in
[0, 1], ``z_t`` keeps each data token with probability t and is otherwise a draw from the source:
a uniform code (``source = "uniform"``, over the codes the tokenizer can emit) or a mask token
(``source = "mask"``). A transformer over the L tokens, conditioned on t and the label, predicts
p(z_1 | z_t); training is cross-entropy on every token. Labels are dropped with probability
``label_dropout`` so one network is also the unconditional model (classifier-free guidance).

Sampling integrates the probability velocity u_t = (p(z_1|z_t) - δ_{z_t}) / (1 - t) with Euler
steps of ``dt = 1 / steps`` (the DAPS authors use dt = 0.025, 40 steps): each token is redrawn
from p(z_1|z_t) with probability dt / (1 - t) and kept otherwise; the last step redraws all.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngkit import hookimpl
from ngkit.components import LatentSpec, Register, StepOutput, host_logs
from ngkit.priors.base import Block, Prior, draw, guided, time_embedding

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")

EMBED_INIT_STD = 0.02


class DiscreteFlowPrior(Prior):
    """A bidirectional transformer p(z_1 | z_t, t, label) with a uniform or masked source."""

    def __init__(
        self,
        *,
        latent: LatentSpec,
        classes: int,
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        label_dropout: float = 0.1,
        steps: int = 40,
        source: Literal["uniform", "mask"] = "uniform",
    ) -> None:
        super().__init__(latent, classes)
        if steps < 1:
            raise ValueError(f"discrete-flow: steps must be at least 1, got {steps}")
        self.label_dropout, self.steps, self.source = label_dropout, steps, source
        self.mask_token = latent.codes  # an input-only index, used by the masked source
        self.tokens = nn.Embedding(latent.codes + 1, width)
        self.positions = nn.Parameter(torch.randn(latent.tokens, width) * EMBED_INIT_STD)
        self.labels = nn.Embedding(classes + 1, width)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, latent.codes)
        self.width = width

    def forward(self, z_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:  # type: ignore[override]
        """Log-probabilities ``[B, L, V]`` of z_1 given ``z_t [B, L]``, ``t [B]``, ``labels [B]``."""
        cond = self.time(time_embedding(t, self.width)) + self.labels(labels)
        h = self.tokens(z_t) + self.positions + cond[:, None]
        for block in self.blocks:
            h = block(h)
        return self.mask_logits(self.head(self.norm(h)).float()).log_softmax(-1)

    def source_codes(self, shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """Draws from the source: the mask token, or a code uniform over the allowed ones."""
        if self.source == "mask":
            return torch.full(shape, self.mask_token, dtype=torch.long, device=device)
        allowed = self.allowed.nonzero().squeeze(1)
        pick = torch.randint(len(allowed), shape, generator=generator, device=device)
        return allowed[pick]

    def corrupt(self, z1: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z_t: each token of ``z1 [B, L]`` kept with probability ``t [B]``, else a source draw."""
        keep = torch.rand(z1.shape, generator=generator, device=z1.device) < t[:, None]
        return torch.where(keep, z1, self.source_codes(z1.shape, generator, z1.device))

    def loss(self, codes: Tensor, labels: Tensor) -> StepOutput:
        t = torch.rand(codes.shape[0], device=codes.device)
        logp = self(self.corrupt(codes, t), t, self.drop_labels(labels, self.label_dropout))
        nll = F.nll_loss(logp.flatten(0, 1), codes.flatten(), reduction="mean")
        loss = nll * codes.shape[1]  # nats per sequence
        accuracy = (logp.argmax(-1) == codes).float().mean()
        return StepOutput(loss, host_logs({"loss": loss.detach(), "token_accuracy": accuracy}))

    @torch.no_grad()
    def sample(self, labels: Tensor, *, guidance: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        n, device = labels.shape[0], labels.device
        z = self.source_codes(torch.Size((n, self.latent.tokens)), generator, device)
        dt = 1.0 / self.steps
        for k in range(self.steps):
            t = torch.full((n,), k * dt, device=device)
            logp = self.predict(z, t, labels, guidance)
            jump = torch.rand(z.shape, generator=generator, device=device) < min(1.0, dt / (1.0 - k * dt))
            z = torch.where(jump, draw(logp, generator), z)
        return z

    def predict(self, z: Tensor, t: Tensor, labels: Tensor, guidance: float) -> Tensor:
        """Guided log-probabilities of z_1 (one pass over conditional and null labels together)."""
        if self.classes == 0:  # every label is the null label: nothing to guide
            return self(z, t, labels)
        both = self(torch.cat([z, z]), torch.cat([t, t]), torch.cat([labels, self.null_labels(labels)]))
        cond, uncond = (logp.masked_fill(~self.allowed, 0.0) for logp in both.chunk(2))  # no -inf - -inf
        return self.mask_logits(guided(cond, uncond, guidance))


@hookimpl
def register_priors(register: Register) -> None:
    register("discrete-flow", DiscreteFlowPrior)
