"""A trained tokenizer as a plain PyTorch object: images in [0, 1] <-> codes ``[B, L]``.

    import ngkit
    tok = ngkit.load("runs/quickstart/export")   # or a run directory, or one of its checkpoints
    codes = tok.encode(images)                   # [B, C, H, W] in [0, 1] -> LongTensor [B, L]
    images = tok.decode(codes)                   # -> [B, C, H, W] in [0, 1]

Loading imports neither DeepSpeed nor the training dataset and makes no process group (a
ZeRO-3 run directory is the exception: its partitions are consolidated with DeepSpeed; export it
once with ``ngkit export`` instead).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ngkit.components import ImageSpec, LatentSpec, Method
from ngkit.errors import DataError, NgkitError, PluginError, WeightsError


class Tokenizer:
    """Encode images to discrete codes and decode codes to images with a trained method."""

    def __init__(self, method: Method, config: dict[str, Any]) -> None:
        self.method = method.eval()
        self.config = config
        self.image, self.latent = specs(config)

    def __repr__(self) -> str:
        grid = "x".join(map(str, self.latent.grid))
        return (
            f"Tokenizer({self.config['method']}: {self.image.channels}x{self.image.height}x{self.image.width} "
            f"images <-> {grid} tokens of {self.latent.codes} codes, step {self.config['step']}, {self.device})"
        )

    @classmethod
    def new(cls, method: str = "daps-na", *, codes: int, image_size: int | tuple[int, int], **options: Any) -> Tokenizer:
        """A built, untrained tokenizer from the registered plugins, without a recipe:
        ``Tokenizer.new(method="fsq", codes=256, image_size=32)``. Options (``channels``,
        ``patch_size``, ``encoder``, ``decoder``, then the method's keys) are those of
        :func:`ngkit.untrained.new_tokenizer`."""
        from ngkit.untrained import new_tokenizer

        return new_tokenizer(method, codes=codes, image_size=image_size, **options)

    @property
    def device(self) -> torch.device:
        return next(self.method.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.method.parameters()).dtype

    def to(self, device: str | torch.device) -> Tokenizer:
        """Move the weights to ``device`` (inputs are moved there by encode/decode)."""
        self.method.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: Tensor, *, sample: bool = False) -> Tensor:
        """Codes ``[B, L]`` (long, row-major over the latent grid) of images ``[B, C, H, W]`` in
        [0, 1]. Deterministic (the encoder's most likely codes) unless ``sample``: then codes are
        drawn from q(z|x), as DAPS does in training (seed with ``torch.manual_seed``)."""
        self._check_images(images)
        x = images.to(self.device, self.dtype)
        if not sample:
            return self.method.encode(x)
        if not self.config["sample"]:
            raise NgkitError(
                f'method "{self.config["method"]}" has a deterministic encoder: there are no codes to '
                f"sample; call encode(images) without sample=True"
            )
        return self.method.sample_codes(x)  # type: ignore[attr-defined]

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` (float32, in [0, 1]) from codes ``[B, L]``."""
        self._check_codes(codes)
        return self.method.decode(codes.to(self.device, torch.long)).float().clamp(0, 1)

    def encode_batch(self, images: Iterable[Tensor], *, batch_size: int = 64, sample: bool = False) -> Iterator[Tensor]:
        """Codes for a stream of single images ``[C, H, W]`` (grouped ``batch_size`` at a time)
        or of batches ``[B, C, H, W]`` (encoded as they come); yields ``[b, L]`` per batch."""
        for batch in _batches(images, 3, batch_size):
            yield self.encode(batch, sample=sample)

    def decode_batch(self, codes: Iterable[Tensor], *, batch_size: int = 64) -> Iterator[Tensor]:
        """Images for a stream of code rows ``[L]`` or batches ``[B, L]``; yields ``[b, C, H, W]``."""
        for batch in _batches(codes, 1, batch_size):
            yield self.decode(batch)

    def _check_images(self, images: Tensor) -> None:
        want = f"[B, {self.image.channels}, {self.image.height}, {self.image.width}]"
        if not isinstance(images, Tensor):
            raise DataError(f"Tokenizer.encode takes a torch.Tensor {want}, not {type(images).__name__}")
        if images.dim() == 3 and tuple(images.shape) == self.image.shape:
            raise DataError(f"Tokenizer.encode takes a batch {want}; for one image use images.unsqueeze(0)")
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image.shape:
            raise DataError(
                f"Tokenizer.encode: images of shape {list(images.shape)} do not fit this tokenizer, which "
                f"takes {want} (channels, height, width of its training images); resize or crop them first"
            )
        if not images.is_floating_point():
            raise DataError(
                f"Tokenizer.encode: images are {images.dtype}; it takes floats in [0, 1], "
                f"e.g. images.float() / 255 for 8-bit pixels"
            )
        if images.numel() == 0:
            return
        low, high = torch.aminmax(images.detach().float())
        if not (torch.isfinite(low) and torch.isfinite(high)):
            raise DataError("Tokenizer.encode: images have non-finite pixels (NaN or inf)")
        if low < 0 or high > 1:
            raise DataError(
                f"Tokenizer.encode: pixels must lie in [0, 1], found {low.item():.4g}..{high.item():.4g}; divide "
                f"8-bit images by 255 and undo any normalisation (the tokenizer standardises them itself)"
            )

    def _check_codes(self, codes: Tensor) -> None:
        want = f"[B, {self.latent.tokens}]"
        if not isinstance(codes, Tensor):
            raise DataError(f"Tokenizer.decode takes a torch.Tensor {want} of codes, not {type(codes).__name__}")
        if codes.dim() != 2 or codes.shape[1] != self.latent.tokens:
            grid = "x".join(map(str, self.latent.grid))
            raise DataError(
                f"Tokenizer.decode: codes of shape {list(codes.shape)} do not fit this tokenizer, which takes "
                f"{want} ({grid} tokens, row-major); reshape with codes.reshape(len(codes), -1)"
            )
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise DataError(f"Tokenizer.decode: codes are {codes.dtype}; they must be integers (e.g. codes.long())")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.latent.codes):
            raise DataError(
                f"Tokenizer.decode: codes must lie in 0..{self.latent.codes - 1}, found "
                f"{codes.min().item()}..{codes.max().item()}"
            )


def _batches(items: Iterable[Tensor], single_dims: int, batch_size: int) -> Iterator[Tensor]:
    """Batches from a stream of single items (``single_dims`` dims) and/or whole batches."""
    pending: list[Tensor] = []
    for item in items:
        if item.dim() == single_dims:
            pending.append(item)
            if len(pending) == batch_size:
                yield torch.stack(pending)
                pending = []
            continue
        if pending:
            yield torch.stack(pending)
            pending = []
        yield item
    if pending:
        yield torch.stack(pending)


def specs(config: dict[str, Any]) -> tuple[ImageSpec, LatentSpec]:
    """The image and latent spec an export's config describes."""
    image = config["image"]
    return (
        ImageSpec(image["channels"], image["height"], image["width"], tuple(image["mean"]), tuple(image["std"])),
        LatentSpec(tuple(config["latent"]["grid"]), config["latent"]["codes"]),
    )


def check_sources(config: dict[str, Any], source: str) -> None:
    """Every component the config names is registered; else say which package provides it."""
    from ngkit.plugins import get_registry

    registry = get_registry()
    for where, info in sorted(config["sources"].items()):
        if info["name"] not in registry.entries.get(info["kind"], {}):
            raise PluginError(
                f'{source} [{where}]: {info["kind"][:-1]} "{info["name"]}" is provided by plugin '
                f'"{info["plugin"]}" of package {info["package"]} {info["version"]}, which is not installed '
                f"or not enabled; install it (pip install {info['package']}) or check NGKIT_PLUGINS"
            )


def from_export(config: dict[str, Any], state: dict[str, Tensor], source: str) -> Tokenizer:
    """Rebuild the method an export describes and load its weights."""
    from ngkit.engine.build import build_method
    from ngkit.export import DTYPES, FORMAT, FORMAT_VERSION
    from ngkit.export_config import check_config

    if not isinstance(config, dict):
        raise WeightsError(f"{source} is not an ngkit tokenizer config (a JSON object)")
    if config.get("format") != FORMAT or config.get("format_version", 0) > FORMAT_VERSION:
        raise WeightsError(
            f"{source} is not an ngkit tokenizer config of format {FORMAT} <= {FORMAT_VERSION} (found "
            f"{config.get('format')!r} version {config.get('format_version')!r}); upgrade ngkit or re-export"
        )
    check_config(config, source)
    check_sources(config, source)
    try:
        with torch.random.fork_rng(devices=[]):  # building draws initial weights; leave the caller's RNG be
            _, method = build_method(config["components"], *specs(config), config["total_steps"])
    except NgkitError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError) as exc:
        raise WeightsError(
            f"{source}: its components cannot be built ({type(exc).__name__}: {str(exc)[:300]}); the config "
            f"was changed by hand or comes from another version of a plugin"
        ) from exc
    try:
        missing, unexpected = method.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # torch names each tensor whose shape differs, with both shapes
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:6] if line.strip())
        raise WeightsError(
            f"the weights of {source} do not fit the method its config builds: {detail or exc}; the config's "
            f"widths or depths were changed, or the files come from different exports"
        ) from exc
    not_exported = set(config["not_exported"])
    missing = [key for key in missing if key.split(".")[0] not in not_exported]
    if missing or unexpected:
        raise WeightsError(
            f"the weights of {source} do not fit the method its config builds (missing: "
            f"{', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'}); "
            f"re-export the run with this version of ngkit and its plugins"
        )
    return Tokenizer(method.to(DTYPES[config["dtype"]]), config)


def read_export_config(path: Path) -> dict[str, Any]:
    """An export's config.json as a dict, or a :class:`WeightsError` saying why not."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WeightsError(f"{path} is not readable JSON ({type(exc).__name__}: {str(exc)[:200]}); re-export it") from exc
    if not isinstance(config, dict):
        raise WeightsError(f"{path} is not an ngkit tokenizer config (a JSON object, found {type(config).__name__})")
    return config


def read_export_weights(folder: Path, config: dict[str, Any]) -> dict[str, Tensor]:
    """The export's tensors, after checking the SHA-256 its config records (a torn or mixed export
    is refused); safetensors holds no code, and a damaged file is one clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ngkit.weights import sha256_of
    from ngkit.export import CONFIG, WEIGHTS

    weights = folder / WEIGHTS
    recorded = config.get("files", {}).get(WEIGHTS) if isinstance(config.get("files"), dict) else None
    if recorded is not None and sha256_of(weights) != recorded:
        raise WeightsError(
            f"{weights} does not match the SHA-256 its {CONFIG} records: the export is torn (interrupted while "
            f"being written) or its files come from different exports; export it again"
        )
    try:
        return load_file(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{weights} is not a readable safetensors file ({exc}); export it again") from exc


def load(path: str | Path, *, step: int | None = None, device: str | torch.device = "cpu") -> Tokenizer:
    """A trained tokenizer from an export folder (``ngkit export``), a run directory (its latest
    checkpoint, or ``step``) or a checkpoint directory ``RUN/checkpoints/step-N``."""
    from ngkit.export import CONFIG, WEIGHTS, snapshot

    path = Path(path)
    if (path / CONFIG).is_file():
        if step is not None:
            raise NgkitError(f"{path} is an export of one step ({CONFIG}); step= applies to run directories")
        if not (path / WEIGHTS).is_file():
            raise WeightsError(f"{path} has a {CONFIG} but no {WEIGHTS}; re-export it with ngkit export")
        config = read_export_config(path / CONFIG)
        tokenizer = from_export(config, read_export_weights(path, config), str(path / CONFIG))
    elif path.is_dir():
        snap = snapshot(path, step=step)
        tokenizer = from_export(snap.config, snap.state, str(path))
    else:
        raise NgkitError(
            f"{path} does not exist or is not a directory; pass an export folder (with {CONFIG}), a run "
            f"directory or RUN/checkpoints/step-N"
        )
    return tokenizer.to(device)
