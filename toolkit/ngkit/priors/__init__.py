"""Generative priors over a frozen tokenizer's codes: training (``ngkit prior train``), sampling
(``ngkit sample``) and generation scores. See docs/priors.md."""

from __future__ import annotations

from typing import Any

__all__ = ["Prior"]


def __getattr__(name: str) -> Any:
    """``ngkit.priors.Prior`` on first use: the CLI imports this package for its recipe check, and
    ``ngkit --help`` must not pay for torch."""
    if name == "Prior":
        from ngkit.priors.base import Prior

        return Prior
    raise AttributeError(f"module 'ngkit.priors' has no attribute {name!r}")
