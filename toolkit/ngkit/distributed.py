"""Cross-rank reductions a plugin may call (part of ngkit's plugin API, see
docs/writing-a-plugin.md "What a plugin may import").

Each is the identity in a one-process run and an all-reduce over the default process group
otherwise; every rank must call it at the same point (as with any collective).
"""

from __future__ import annotations

from ngkit.engine.distributed import mean_over_ranks, sum_over_ranks

__all__ = ["mean_over_ranks", "sum_over_ranks"]
