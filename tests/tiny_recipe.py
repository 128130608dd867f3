"""A recipe small enough to train in seconds: digits, a 1-layer transformer, 4x4 tokens."""

from __future__ import annotations

import copy
from typing import Any

TINY: dict[str, Any] = {
    "data": {"name": "digits", "batch_size": 16},
    "model": {
        "codes": 16,
        "patch_size": 2,
        "encoder": {"name": "transformer", "width": 32, "depth": 1, "heads": 2, "latent_depth": 1, "factorised": True},
        "decoder": {"name": "conv", "width": 16, "embed_dim": 16},
    },
    "method": {"name": "daps-na", "samples": 4},
    "schedule": {"beta": {"name": "exponential", "start": 0.5, "end": 0.01}},
    "run": {"steps": 12, "seed": 0, "log_every": 2, "eval_every": 6, "checkpoint_every": 6},
    "eval": {"metrics": ["mse", "psnr", "usage"], "num_images": 32, "batch_size": 16},
}


def tiny(**sections: dict[str, Any]) -> dict[str, Any]:
    """TINY with some sections' keys replaced (a ``method`` section replaces the method whole)."""
    raw = copy.deepcopy(TINY)
    for name, values in sections.items():
        if name == "method":
            raw["method"] = dict(values)
        else:
            raw.setdefault(name, {}).update(values)
    return raw
