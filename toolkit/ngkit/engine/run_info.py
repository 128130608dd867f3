"""What run hooks (``on_*``) receive about the run in progress."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ngkit.components import ImageDataset, ImageSpec, LatentSpec, Method


@dataclass
class RunInfo:
    out_dir: Path
    recipe: dict[str, Any]  # the resolved recipe, as written to recipe.toml
    method: Method
    dataset: ImageDataset
    image: ImageSpec
    latent: LatentSpec
    device: torch.device
    rank: int
    world_size: int
