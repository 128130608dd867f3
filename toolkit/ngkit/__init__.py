"""ngkit: composable discrete image tokenizers trained with DAPS.

Plugins import the hook marker from here::

    from ngkit import hookimpl

    @hookimpl
    def register_decoders(register):
        register("my-decoder", MyDecoder)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from ngkit.tokenizer import Tokenizer

__version__ = "0.1.0"

PLUGIN_API = 3
"""The plugin API this ngkit speaks. A plugin package declares the one it was written for with
``NGKIT_PLUGIN_API = 3`` in its entry-point module; the changelog is in docs/writing-a-plugin.md
(and :data:`ngkit.contracts.CHANGES`)."""

hookimpl = pluggy.HookimplMarker("ngkit")
"""Marker for plugin hook implementations."""


def load(
    path: str | Path, *, step: int | None = None, device: str | torch.device = "cpu", revision: str | None = None
) -> Tokenizer:
    """A trained tokenizer from an export folder, a run directory, a checkpoint (see
    :func:`ngkit.tokenizer.load`) or a Hugging Face Hub id ``"user/repo"`` (at ``revision``;
    :mod:`ngkit.hub`); imported on first use, so ``import ngkit`` stays light."""
    from ngkit.hub import resolve
    from ngkit.tokenizer import load as load_tokenizer

    return load_tokenizer(resolve(path, revision), step=step, device=device)


def quantizer(name: str, *, codes: int, **options: object) -> torch.nn.Module:
    """A registered quantizer as a plain module (see :func:`ngkit.untrained.new_quantizer`):
    ``q = ngkit.quantizer("rvq", codes=256); quantized, codes, aux, logs = q(h)``."""
    from ngkit.untrained import new_quantizer

    return new_quantizer(name, codes=codes, **options)


def __getattr__(name: str) -> object:
    """``from ngkit import Tokenizer`` without importing torch at ``import ngkit``."""
    if name == "Tokenizer":
        from ngkit.tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'ngkit' has no attribute {name!r}")


def versions() -> dict[str, str]:
    """Versions of the libraries that decide a number, recorded with every metric."""
    import torch
    import torchmetrics

    return {"ngkit": __version__, "torch": torch.__version__, "torchmetrics": torchmetrics.__version__}


__all__ = ["PLUGIN_API", "Tokenizer", "__version__", "hookimpl", "load", "quantizer", "versions"]
