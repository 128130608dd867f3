"""ngkit: composable discrete image tokenizers trained with DAPS.

Plugins import the hook marker from here::

    from ngkit import hookimpl

    @hookimpl
    def register_decoders(register):
        register("my-decoder", MyDecoder)
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("ngkit")
"""Marker for plugin hook implementations."""



def versions() -> dict[str, str]:
    """Versions of the libraries that decide a number, recorded with every metric."""
    import torch
    import torchmetrics

    return {"ngkit": __version__, "torch": torch.__version__, "torchmetrics": torchmetrics.__version__}


__all__ = ["__version__", "hookimpl", "versions"]
