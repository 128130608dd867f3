"""Built-in metric ``"distinct"``: the fraction of distinct code sequences among the evaluated
codes. For a prior run the codes are its samples (see :mod:`ngkit.priors.trainer`), so a prior
that repeats itself scores below 1; for a tokenizer run they are the held-out images' codes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ngkit import hookimpl
from ngkit.components import EvalBatch, Register
from ngkit.errors import NgkitError
from ngkit.priors.scores import distinct_fraction

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")


def _gather_rows(rows: Tensor) -> Tensor:
    """Every rank's rows (ranks may hold different numbers of them)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return rows
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows.cpu())
    return torch.cat(parts)


class DistinctMetric:
    """Distinct code sequences / sequences evaluated."""

    def __init__(self) -> None:
        self._rows: list[Tensor] = []
        self._count = 0

    def update(self, batch: EvalBatch) -> None:
        self._rows.append(batch.codes.detach().long().cpu())

    def compute(self) -> dict[str, float]:
        if not self._rows:
            raise NgkitError("distinct: no codes were evaluated")
        rows = _gather_rows(torch.cat(self._rows))
        self._count = len(rows)
        return {"distinct": distinct_fraction(rows)}

    def protocol(self) -> dict[str, Any]:
        return {"definition": "distinct code sequences / evaluated sequences (all ranks)", "sequences": self._count}


@hookimpl
def register_metrics(register: Register) -> None:
    register("distinct", DistinctMetric)
