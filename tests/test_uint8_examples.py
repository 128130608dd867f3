"""Training examples may be uint8 (issue 24): the batches are the float32 values of x / 255 that
the float path gave, bit for bit, and a dataset returning float still works, finite check included."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ngkit import imaging
from ngkit.channels import WithChannels, convert
from ngkit.components import Example, ImageSpec
from ngkit.data import TrainBatches, _stack, pixels
from ngkit.errors import DataError
from ngkit_plugins.hf_data import _resize_crop


def _old_resize_crop(img: Image.Image, size: int, rng: np.random.Generator | None, flip: bool) -> torch.Tensor:
    """hf_data._resize_crop before uint8 examples (float32 per image), the reference."""
    w, h = img.size
    scale = size / min(w, h)
    out_w, out_h = max(size, round(w * scale)), max(size, round(h * scale))
    if rng is None:
        left, top = (out_w - size) // 2, (out_h - size) // 2
    else:
        left, top = int(rng.integers(0, out_w - size + 1)), int(rng.integers(0, out_h - size + 1))
    sx, sy = w / out_w, h / out_h
    box = (left * sx, top * sy, min(w, (left + size) * sx), min(h, (top + size) * sy))
    img = img.resize((size, size), Image.BICUBIC, box=box)
    if rng is not None and flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.array(img)
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0))


def test_every_uint8_value_converts_to_the_float_paths_value():
    values = torch.arange(256, dtype=torch.uint8).view(1, 16, 16)
    want = torch.from_numpy(np.arange(256, dtype=np.float32).reshape(1, 16, 16) / np.float32(255.0))
    assert torch.equal(pixels(values), want)
    assert torch.equal(_stack([values, values.permute(0, 2, 1)], (1, 16, 16)),
                       torch.stack([want, want.permute(0, 2, 1)]))
    assert _stack([values], (1, 16, 16)).is_contiguous()


def _jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).resize((w, h)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("decoder", [d for d in imaging.EXACT if d in imaging.available_decoders()])
def test_crops_batched_from_uint8_equal_the_float_path(decoder):
    rng = np.random.default_rng(3)
    for i in range(24):
        w, h = int(rng.integers(40, 140)), int(rng.integers(40, 140))
        blob, size = _jpeg(rng, w, h), int(rng.integers(8, min(w, h) + 1))
        channels = 1 if i % 5 == 0 else 3
        mode = "RGB" if channels == 3 else "L"
        ref_img = imaging.decode(blob, None, "pil").convert(mode)  # what the float path decoded
        img = imaging.decode(blob, None, decoder)
        img = img if img.mode == mode else img.convert(mode)
        seed = [i, 7]
        want = _old_resize_crop(ref_img, size, np.random.default_rng(seed), True)
        got = _resize_crop(img, size, np.random.default_rng(seed), True)
        assert got.dtype == torch.uint8 and got.shape == want.shape
        assert torch.equal(_stack([got], tuple(want.shape))[0], want)
        assert torch.equal(pixels(got), want)


def test_the_mapped_simplejpeg_image_has_pillows_pixels():
    if "simplejpeg" not in imaging.available_decoders():
        pytest.skip("simplejpeg is not installed")
    blob = _jpeg(np.random.default_rng(0), 123, 77)
    mapped, pil = imaging.decode(blob, None, "simplejpeg"), imaging.decode(blob, None, "pil")
    assert mapped.mode == "RGB" and mapped.size == pil.size
    assert np.array_equal(np.asarray(mapped), np.asarray(pil))
    for op in (lambda im: im.resize((50, 40), Image.BICUBIC, box=(3.5, 2.25, 100.0, 70.0)),
               lambda im: im.convert("L"), lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)):
        assert np.array_equal(np.asarray(op(mapped)), np.asarray(op(pil)))
    mapped.putpixel((0, 0), (1, 2, 3))  # readonly: Pillow copies before writing
    assert mapped.getpixel((0, 0)) == (1, 2, 3)


class _Mixed:
    """uint8 examples and float examples (a third-party dataset) in one stream."""

    def __init__(self, bad: int | None = None) -> None:
        self.spec, self.bad = ImageSpec(3, 4, 4, (0.5,) * 3, (0.25,) * 3), bad

    def image(self, i: int) -> torch.Tensor:
        u8 = torch.randint(0, 256, (3, 4, 4), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        if i % 2:
            return u8
        img = u8.double() / 255  # float64: cast to float32 as before
        if i == self.bad:
            img[0, 0, 0] = float("nan")
        return img

    def train(self, *, seed, epoch, shard, num_shards, start=0):
        for i in range(shard + start * num_shards, 16, num_shards):
            yield Example(lambda i=i: self.image(i), f"image {i}")

    def test(self, *, shard, num_shards, limit):
        return iter(())


def test_uint8_and_float_examples_batch_as_the_float_path_did():
    ds = _Mixed()
    got = next(TrainBatches(ds, 8, seed=0, rank=0, world=1))
    want = torch.stack([(img.float() / 255 if img.dtype == torch.uint8 else img.float()) for img in map(ds.image, range(8))])
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_a_non_finite_float_example_is_named_beside_uint8_ones():
    with pytest.raises(DataError, match="image 4"):
        next(TrainBatches(_Mixed(bad=4), 8, seed=0, rank=0, world=1))


def test_channels_wrapper_takes_uint8_examples():
    ds = _Mixed()
    grey = WithChannels(ds, 1)
    ex = next(iter(grey.train(seed=0, epoch=0, shard=0, num_shards=1, start=1)))  # image 1: uint8
    assert torch.equal(ex.load(), convert(ds.image(1).float() / 255, 1))
