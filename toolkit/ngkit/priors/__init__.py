"""Generative priors over a frozen tokenizer's codes: training (``ngkit prior train``), sampling
(``ngkit sample``) and generation scores. See docs/priors.md."""

from ngkit.priors.base import Prior

__all__ = ["Prior"]
