"""A prior as the engine's :class:`ngkit.components.Method`, and the builder that makes one.

``ngkit prior train`` hands :func:`prior_builder` to :func:`ngkit.engine.train_loop.train`: the
same loop (DeepSpeed, checkpoints, resume, progress, metrics.jsonl, curves) trains the prior on
the packed codes of :class:`ngkit.priors.codes.CodeDataset`. At the end of training the engine's
evaluation calls ``encode`` (which samples, one label after another) and ``decode`` (the frozen
tokenizer), so the run's ``reconstructions.png`` shows held-out images above generated samples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ngkit.binding import build_component
from ngkit.components import Method, StepOutput
from ngkit.engine.build import Built
from ngkit.priors.base import Prior
from ngkit.priors.codes import CodeDataset, unpack
from ngkit.tokenizer import Tokenizer


class PriorMethod(Method):
    """Trains ``prior``; the tokenizer stays frozen and outside the module (not trained, not
    checkpointed: the recipe names it)."""

    def __init__(self, prior: Prior, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.prior = prior
        self.latent = prior.latent
        self._tokenizer = (tokenizer,)  # a tuple, so that nn.Module does not register its weights

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer[0]

    def forward(self, x: Tensor, step: int) -> StepOutput:  # type: ignore[override]
        codes, labels = unpack(x, self.latent.tokens)
        return self.prior.loss(codes, labels)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Samples, one per image of ``x`` (only its batch size is used), labels 0, 1, ... in turn."""
        n = x.shape[0]
        labels = torch.arange(n, device=x.device) % max(1, self.prior.classes)
        if self.prior.classes == 0:
            labels = self.prior.null_labels(labels)
        return self.prior.sample(labels)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.tokenizer.to(z.device).decode(z)


def build_prior(table: dict[str, Any], tokenizer: Tokenizer, classes: int) -> Prior:
    """The registered prior a ``[prior]`` table names, for this tokenizer's codes."""
    return build_component("priors", table, {"latent": tokenizer.latent, "classes": classes}, "prior")


def prior_builder(table: dict[str, Any], tokenizer: Tokenizer, codes: CodeDataset, mask_unused: bool) -> Callable[[Any], Built]:
    """A builder for the training loop: the data is already encoded, the prior is built inside
    the loop (after it seeds the initial weights)."""

    def builder(recipe: Any) -> Built:
        prior = build_prior(table, tokenizer, codes.classes)
        if mask_unused:
            prior.allowed.copy_(codes.emitted())
        return Built(codes, codes.spec, codes.latent, lambda step: 0.0, PriorMethod(prior, tokenizer))  # type: ignore[arg-type]

    return builder
