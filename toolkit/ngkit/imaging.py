"""Decoding training images fast: a JPEG is decoded straight to the smallest size it is used at.

Decoding is most of the CPU work of feeding a GPU ImageNet (benchmarks/data.py measures it). A
JPEG's 8x8 DCT blocks can be inverse-transformed at a reduced scale (n/8 of each side), so a
~500 px photo that is resized to 256 px anyway needs only a fraction of a full decode. Decoders,
fastest first, used when installed (``pip install ngkit[jpeg]``):

- ``simplejpeg``: libjpeg-turbo with any n/8 scale (n = 1..8), straight to RGB;
- ``pil``: Pillow with ``draft`` (libjpeg's 1/2, 1/4, 1/8 scales), always available;
- ``pil-full``: Pillow at full size (what ngkit did before; the reference for the others).

Both give the image whose shorter side is at least ``min_side``; the caller resizes it to the
exact size (``ngkit_plugins.hf_data``: bicubic, antialiased). Pixels differ between decoders by
a little less than JPEG's own error (tests/test_data_bench.py bounds it). Anything that is not a
three-channel JPEG (PNG, greyscale, CMYK) is opened by Pillow as it is.
"""

from __future__ import annotations

import functools
import io
import math
import os
from pathlib import Path

from PIL import Image

__all__ = ["DECODERS", "available_decoders", "decode", "default_decoder"]

DECODERS = ("simplejpeg", "pil", "pil-full")  # fastest first
JPEG_MAGIC = b"\xff\xd8"


@functools.cache
def _simplejpeg():  # noqa: ANN202 - the module, or None when it is not installed
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def available_decoders() -> list[str]:
    """The decoders this process can use, fastest first."""
    return [d for d in DECODERS if d != "simplejpeg" or _simplejpeg() is not None]


def default_decoder() -> str:
    """What :func:`decode` uses unless told otherwise: ``NGKIT_JPEG_DECODER`` when set (e.g.
    ``pil-full`` to decode exactly as ngkit did before), else the fastest installed decoder."""
    chosen = os.environ.get("NGKIT_JPEG_DECODER")
    if chosen:
        if chosen not in available_decoders():
            raise ValueError(
                f"NGKIT_JPEG_DECODER={chosen!r} is not available here; choose one of "
                f"{', '.join(available_decoders())} (simplejpeg: pip install 'ngkit[jpeg]')"
            )
        return chosen
    return available_decoders()[0]


def decode(data: bytes | str | Path, min_side: int | None = None, decoder: str | None = None) -> Image.Image:
    """An image from encoded bytes or a file path, decoded (JPEG) at the smallest DCT scale whose
    shorter side is still at least ``min_side`` (None: full size). Other formats open in full."""
    decoder = decoder or default_decoder()
    if decoder not in DECODERS:
        raise ValueError(f"unknown JPEG decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    if not isinstance(data, bytes):
        data = Path(data).read_bytes()
    if decoder == "simplejpeg" and data[:2] == JPEG_MAGIC:
        img = _decode_simplejpeg(data, min_side)
        if img is not None:
            return img
    img = Image.open(io.BytesIO(data))
    if min_side and decoder != "pil-full" and img.format == "JPEG":
        w, h = img.size
        scale = min_side / min(w, h)
        if scale < 1:  # draft keeps both sides at least the requested ones
            img.draft(img.mode, (math.ceil(w * scale), math.ceil(h * scale)))
    img.load()
    return img


def _decode_simplejpeg(data: bytes, min_side: int | None) -> Image.Image | None:
    """An RGB image from a colour JPEG, or None for one simplejpeg should not take (greyscale,
    CMYK, or one it cannot read: Pillow then decides)."""
    sj = _simplejpeg()
    if sj is None:
        raise ValueError("the simplejpeg decoder is not installed: pip install 'ngkit[jpeg]'")
    try:
        h, w, colorspace, _ = sj.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "RGB"):
            return None
        if min_side and min(w, h) > min_side:
            scale = min_side / min(w, h)
            # the smallest n/8 scale keeping both sides >= their share of min_side
            array = sj.decode_jpeg(data, colorspace="RGB", min_height=math.ceil(h * scale),
                                   min_width=math.ceil(w * scale))
        else:
            array = sj.decode_jpeg(data, colorspace="RGB")
    except (ValueError, RuntimeError):
        return None
    return Image.fromarray(array, "RGB")
