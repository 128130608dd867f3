"""Sizes checked before any work: a batch or a model that cannot fit is refused with the estimate.

Without this, ``--set data.batch_size=1000000000`` sat at ``train 0/10`` for minutes and died of
``MemoryError``. The estimate is a lower bound, so nothing that fits is refused:

- training state: 16 bytes per parameter (fp32 weights, gradients, AdamW's two moments);
- per image of a micro-batch: the image and its reconstruction in fp32 for each of the method's
  ``samples`` decodes, plus the encoder's logits (tokens x codes) for each sample.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ngkit.components import ImageSpec, LatentSpec
from ngkit.errors import RecipeError

STATE_BYTES_PER_PARAMETER = 16  # fp32 weight + gradient + Adam exp_avg + exp_avg_sq


def memory_bytes(device: torch.device | str) -> int:
    """Memory of the device training runs on: the GPU's, else the host's physical memory."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device.index or 0).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def per_image_bytes(image: ImageSpec, latent: LatentSpec, samples: int) -> int:
    """A lower bound on the activation memory one training image takes (see the module docstring)."""
    pixels = image.channels * image.height * image.width
    return 4 * max(1, samples) * (2 * pixels + latent.tokens * latent.codes)


def check_memory(
    recipe: Any, image: ImageSpec, latent: LatentSpec, parameters: int, device: torch.device | str, source: str,
) -> None:
    """Refuse a recipe whose model state plus one micro-batch cannot fit in the device's memory."""
    samples = int((recipe.method.options or {}).get("samples", 1)) if hasattr(recipe.method, "options") else 1
    state = STATE_BYTES_PER_PARAMETER * parameters
    batch = recipe.data.batch_size * per_image_bytes(image, latent, samples)
    available = memory_bytes(device)
    if state + batch > available:
        raise RecipeError(source, [
            f"[data] batch_size = {recipe.data.batch_size} with this model needs at least {(state + batch) / 2**30:.3g} GiB "
            f"({parameters:,} parameters x {STATE_BYTES_PER_PARAMETER} bytes of training state = {state / 2**30:.3g} GiB, "
            f"plus {per_image_bytes(image, latent, samples):,} bytes per image x {recipe.data.batch_size}), but "
            f"{torch.device(device).type} memory is {available / 2**30:.3g} GiB; lower batch_size (and use "
            f"[optim] accumulate for a larger global batch) or the model's width/depth"
        ])
