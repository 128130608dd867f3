"""Parts built without a recipe, from the registered plugins: an untrained tokenizer
(:meth:`ngkit.Tokenizer.new`) and a quantizer as a plain ``nn.Module`` (:func:`ngkit.quantizer`).

    from ngkit import Tokenizer
    tok = Tokenizer.new(method="fsq", codes=256, image_size=32)   # 4x4 tokens of 256 codes

Options are checked as a recipe's are (the error names the key), so ``quantizer = "rvq"`` or
``encoder = {"name": "transformer", "width": 64}`` mean what they mean in ``[method]`` and
``[model.encoder]``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ngkit.components import ImageSpec, LatentSpec
from ngkit.tokenizer import Tokenizer

SOURCE = "Tokenizer.new"
DEFAULT_STEPS = 1000  # total_steps for step-indexed schedules (β, temperatures) of an untrained model


def _table(component: str | dict[str, Any]) -> dict[str, Any]:
    return {"name": component} if isinstance(component, str) else dict(component)


def new_tokenizer(
    method: str = "daps-na",
    *,
    codes: int,
    image_size: int | tuple[int, int],
    channels: int = 3,
    patch_size: int = 8,
    encoder: str | dict[str, Any] = "transformer",
    decoder: str | dict[str, Any] = "conv",
    beta: str | dict[str, Any] | None = None,
    total_steps: int = DEFAULT_STEPS,
    **options: Any,
) -> Tokenizer:
    """A built, untrained tokenizer: ``method`` (a registered method name) with ``options`` as its
    ``[method]`` keys, on ``image_size`` images (an int for square) of ``channels`` channels cut into
    ``patch_size`` tokens per side, each one of ``codes`` symbols. Pixel statistics are 0.5 ± 0.25
    per channel (what an encoder standardises with). Train ``tok.method`` yourself, or use a recipe."""
    from ngkit.engine.build import build_method, latent_for
    from ngkit.export import FORMAT, FORMAT_VERSION, can_sample, component_sources, image_config

    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    image = ImageSpec(channels, height, width, (0.5,) * channels, (0.25,) * channels)
    latent = latent_for(image, codes, patch_size, SOURCE)
    tables = {
        "model.encoder": _table(encoder),
        "model.decoder": _table(decoder),
        "schedule.beta": _table(beta or {"name": "constant", "value": 1.0}),
        "method": {"name": method, **options},
    }
    _, built = build_method(tables, image, latent, total_steps, SOURCE)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method,
        "components": tables,
        "sources": component_sources(tables),
        "image": image_config(image),
        "latent": {"grid": list(latent.grid), "codes": latent.codes, "tokens": latent.tokens, "patch_size": patch_size},
        "sample": can_sample(built),
        "dtype": "float32",
        "not_exported": [],
        "total_steps": total_steps,
        "step": 0,
    }
    return Tokenizer(built, config)


def new_quantizer(name: str, *, codes: int, **options: Any) -> nn.Module:
    """A registered quantizer as a plain module of ``codes`` codes:
    ``quantized, codes, aux, logs = q(h)`` for ``h [B, L, q.dim]``. Built for a one-pixel image,
    so quantizers that scale their auxiliary loss by the pixel count (``aux_weight``) give the
    library's own units."""
    from ngkit.binding import build_component

    context = {"image": ImageSpec(1, 1, 1), "latent": LatentSpec((1, 1), codes), "total_steps": DEFAULT_STEPS}
    return build_component("quantizers", {"name": name, **options}, context, "quantizer")
