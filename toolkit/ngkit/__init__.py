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

__all__ = ["__version__", "hookimpl"]
