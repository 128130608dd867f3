"""Prior ``"autoregressive"``: a causal transformer over the token sequence, led by a class token.

Position 0 holds the label embedding (the null label with probability ``label_dropout`` in
training, for classifier-free guidance); position l predicts token l from the label and tokens
< l, row-major over the latent grid. Sampling decodes one token per step with a key/value cache
(``cache = false`` recomputes the whole prefix, for checking), with temperature, top-k, top-p and
guidance u + s (c - u) on log-probabilities; codes the tokenizer cannot emit are never drawn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngkit import hookimpl
from ngkit.components import LatentSpec, Register, StepOutput, host_logs
from ngkit.priors.base import Block, Prior, draw, filter_logits, guided

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")

EMBED_INIT_STD = 0.02


class AutoregressivePrior(Prior):
    """GPT-style p(z_l | z_<l, label) with a KV-cached sampler."""

    def __init__(
        self,
        *,
        latent: LatentSpec,
        classes: int,
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        label_dropout: float = 0.1,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        cache: bool = True,
    ) -> None:
        super().__init__(latent, classes)
        self.label_dropout, self.cache = label_dropout, cache
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.tokens = nn.Embedding(latent.codes, width)
        self.labels = nn.Embedding(classes + 1, width)
        self.positions = nn.Parameter(torch.randn(latent.tokens, width) * EMBED_INIT_STD)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, latent.codes)

    def forward(self, labels: Tensor, codes: Tensor, caches: list[dict[str, Tensor]] | None = None) -> Tensor:  # type: ignore[override]
        """Log-probabilities ``[B, M, V]`` of the tokens after each input position. Without caches
        the input is the label and ``codes [B, M - 1]`` (M = L in training); with caches (filled
        in place) it is the next position only: the label when ``codes`` is empty, else the last code."""
        start = 0 if caches is None or "k" not in caches[0] else caches[0]["k"].shape[1]
        if start == 0:
            h = torch.cat([self.labels(labels)[:, None], self.tokens(codes)], 1)
        else:
            h = self.tokens(codes[:, -1:])
        h = h + self.positions[start : start + h.shape[1]]
        for i, block in enumerate(self.blocks):
            h = block(h, causal=True, cache=None if caches is None else caches[i])
        return self.mask_logits(self.head(self.norm(h)).float()).log_softmax(-1)

    def loss(self, codes: Tensor, labels: Tensor) -> StepOutput:
        logp = self(self.drop_labels(labels, self.label_dropout), codes[:, :-1])
        loss = F.nll_loss(logp.flatten(0, 1), codes.flatten(), reduction="sum") / codes.shape[0]  # nats per sequence
        accuracy = (logp.argmax(-1) == codes).float().mean()
        return StepOutput(loss, host_logs({"loss": loss.detach(), "token_accuracy": accuracy}))

    @torch.no_grad()
    def sample(
        self, labels: Tensor, *, guidance: float = 1.0, generator: torch.Generator | None = None,
        cache: bool | None = None,
    ) -> Tensor:
        cache = self.cache if cache is None else cache
        n = labels.shape[0]
        guide = self.classes > 0  # rows with the null label next to the labelled ones, even at scale 1
        rows = torch.cat([labels, self.null_labels(labels)]) if guide else labels
        caches = [{} for _ in self.blocks] if cache else None
        codes = torch.zeros(rows.shape[0], 0, dtype=torch.long, device=labels.device)
        for _ in range(self.latent.tokens):
            logp = self(rows, codes, caches)[:, -1]
            if guide:
                cond, uncond = (x.masked_fill(~self.allowed, 0.0) for x in logp.chunk(2))  # no -inf - -inf
                logp = self.mask_logits(guided(cond, uncond, guidance))
            nxt = draw(filter_logits(logp, self.temperature, self.top_k, self.top_p), generator)
            codes = torch.cat([codes, (torch.cat([nxt, nxt]) if guide else nxt)[:, None]], 1)
        return codes[:n]


@hookimpl
def register_priors(register: Register) -> None:
    register("autoregressive", AutoregressivePrior)
