"""Public building blocks for metric plugins (part of ngkit's plugin API, see
docs/writing-a-plugin.md "What a plugin may import").

- :class:`FIDInceptionV3` (:mod:`ngkit.metrics.inception`): the TF-ported FID Inception-v3 in
  plain torch, with its input size and feature width.
- :func:`sum_over_ranks` (re-exported from :mod:`ngkit.distributed`): combine per-rank sums.
"""

from __future__ import annotations

from ngkit.distributed import sum_over_ranks
from ngkit.metrics.inception import FEATURE_DIM, INPUT_SIZE, FIDInceptionV3

__all__ = ["FEATURE_DIM", "INPUT_SIZE", "FIDInceptionV3", "sum_over_ranks"]
