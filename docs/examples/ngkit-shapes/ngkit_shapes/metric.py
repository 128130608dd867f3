"""Metric ``foreground-iou``: intersection over union of the pixels above ``threshold`` in an
image and in its reconstruction, averaged over images (an image with no foreground in either
counts as 1)."""

from __future__ import annotations

from typing import Any

import torch

from ngkit import hookimpl, versions
from ngkit.components import EvalBatch
from ngkit.distributed import sum_over_ranks

NGKIT_PLUGIN_API = 3  # the ngkit plugin API this module was written for


class ForegroundIoU:
    def __init__(self, threshold: float = 0.25) -> None:
        self.threshold = threshold
        self.totals = torch.zeros(2, dtype=torch.float64)  # (sum of IoUs, images)
        self.images = 0

    def update(self, batch: EvalBatch) -> None:
        a = (batch.images > self.threshold).flatten(1)
        b = (batch.reconstructions > self.threshold).flatten(1)
        union = (a | b).sum(1).double()
        iou = torch.where(union > 0, (a & b).sum(1).double() / union.clamp(min=1), 1.0)
        self.totals = self.totals.to(iou.device) + torch.stack([iou.sum(), iou.new_tensor(len(iou))])

    def compute(self) -> dict[str, float]:
        total, count = sum_over_ranks(self.totals).tolist()  # every rank's images
        self.images = int(count)
        return {"foreground_iou": total / max(count, 1)}

    def protocol(self) -> dict[str, Any]:
        return {"metric": "foreground-iou", "threshold": self.threshold, "images": self.images, "versions": versions()}


@hookimpl
def register_metrics(register) -> None:
    register("foreground-iou", ForegroundIoU)
