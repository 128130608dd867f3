"""Decoding training images: the fastest installed JPEG decoder that gives the same pixels, and
an opt-in faster one that decodes straight to the size an image is used at.

Decoding and resizing are most of the CPU work of feeding a GPU ImageNet (benchmarks/data.py
measures them). Decoders (``NGKIT_JPEG_DECODER`` picks one; the default is the first installed
of the exact ones):

- ``simplejpeg`` (``pip install 'ngkit[jpeg]'``): libjpeg-turbo straight to RGB, the same pixels
  as Pillow (tested) with a little less overhead;
- ``pil``: Pillow, always available (what ngkit always did);
- ``simplejpeg-dct`` / ``pil-dct``: inverse DCT at a reduced scale (n/8 of each side for
  simplejpeg; 1/2, 1/4, 1/8 for Pillow's ``draft``), the smallest whose shorter side is still at
  least ``min_side``, so the resize that follows has a fraction of the pixels. A truncated DCT
  is a sharper low-pass than the bicubic resize it replaces: on benchmarks/data.py's photos the
  pixels differ from a full decode by about as much as JPEG q90 itself changes the picture (mean
  1-4.5/255, up to 0.56 on a few pixels of hard saturated edges; tests/test_data_bench.py), so
  this is not the default.

Anything that is not a JPEG opens with Pillow as it is.
"""

from __future__ import annotations

import functools
import io
import math
import os
from pathlib import Path

from PIL import Image

__all__ = ["DECODERS", "available_decoders", "decode", "default_decoder"]

EXACT = ("simplejpeg", "pil")  # fastest first: the default is the first one installed
DECODERS = EXACT + ("simplejpeg-dct", "pil-dct")
JPEG_MAGIC = b"\xff\xd8"


@functools.cache
def _simplejpeg():  # noqa: ANN202 - the module, or None when it is not installed
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def available_decoders() -> list[str]:
    """The decoders this process can use: the exact ones fastest first, then the DCT-scaled."""
    return [d for d in DECODERS if not d.startswith("simplejpeg") or _simplejpeg() is not None]


def default_decoder() -> str:
    """What :func:`decode` uses unless told otherwise: ``NGKIT_JPEG_DECODER`` when set, else the
    fastest installed decoder that gives Pillow's pixels."""
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
    """An image from encoded bytes or a file path. ``min_side``: the shorter side the caller
    resizes to; only the ``-dct`` decoders use it (a JPEG is then decoded at the smallest DCT
    scale whose shorter side is still at least that)."""
    decoder = decoder or default_decoder()
    if decoder not in DECODERS:
        raise ValueError(f"unknown JPEG decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    if not isinstance(data, bytes):
        data = Path(data).read_bytes()
    scaled = decoder.endswith("-dct") and bool(min_side)
    if decoder.startswith("simplejpeg") and data[:2] == JPEG_MAGIC:
        img = _decode_simplejpeg(data, min_side if scaled else None)
        if img is not None:
            return img
    img = Image.open(io.BytesIO(data))
    if scaled and img.format == "JPEG":
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
            scale = min_side / min(w, h)  # the smallest n/8 scale keeping both sides >= their share
            array = sj.decode_jpeg(data, colorspace="RGB", min_height=math.ceil(h * scale),
                                   min_width=math.ceil(w * scale))
        else:
            array = sj.decode_jpeg(data, colorspace="RGBX")
    except (ValueError, RuntimeError):
        return None
    return _rgb_view(array)


def _rgb_view(array: object) -> Image.Image:
    """An ``RGB`` image over simplejpeg's ``[H, W, 4]`` RGBX array, without a copy: Pillow stores
    RGB as four bytes a pixel, the fourth 255, which is what libjpeg-turbo's RGBX writes; so the
    array is Pillow's own layout. Mapped as ``RGB`` (not ``RGBX``, which Pillow would resample as
    four bands, a third slower); ``Image.frombuffer`` maps only ``RGBX``, so this uses Pillow's
    ``core.map_buffer``, with a copy (``fromarray`` of the three channels) if that is missing.
    Saves 0.3 ms of a ~3 ms crop (benchmarks/data.py)."""
    h, w = array.shape[:2]
    try:
        img = Image.new("RGB", (0, 0))._new(Image.core.map_buffer(array, (w, h), "raw", 0, ("RGB", 0, 1)))
    except (AttributeError, TypeError, ValueError):
        return Image.fromarray(array[..., :3], "RGB")
    img.readonly = 1  # Pillow copies it before any in-place change, as for frombuffer's images
    return img
