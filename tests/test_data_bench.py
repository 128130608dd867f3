"""ngkit.imaging's decoders against Pillow's full-size decode, and benchmarks/data.py end to end.

The exact decoders (the default) must give Pillow's pixels. The DCT-scaled ones (opt-in) differ
by about JPEG q90's own error; the bounds below catch a shifted grid, swapped channels or a
wrong scale (those differ by 0.3 and more almost everywhere), not the filter's own difference
(1 % of pixels differ by 0.06-0.18, a few by up to 0.56, on hard saturated edges).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ngkit import imaging
from ngkit_plugins.hf_data import _open, _resize_crop

from child_processes import child_env

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "data.py"
sys.path.insert(0, str(BENCH.parent))
from data import synthetic_photo  # noqa: E402


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, subsampling="4:2:0")
    return buf.getvalue()


def _crop(img: Image.Image) -> np.ndarray:
    return _resize_crop(img.convert("RGB"), 256, None, False).numpy() / 255.0  # uint8 -> [0, 1]


@pytest.fixture(scope="module")
def photos() -> list[tuple[Image.Image, bytes]]:
    rng = np.random.default_rng(7)
    return [(img, _jpeg(img)) for img in (synthetic_photo(rng) for _ in range(4))]


@pytest.mark.parametrize("decoder", imaging.available_decoders())
def test_decoders_against_a_full_size_decode(photos, decoder):
    for source, blob in photos:
        full = _crop(imaging.decode(blob, None, "pil"))
        jpeg_error = np.abs(full - _crop(source)).mean()  # what JPEG q90 changes: ~3/255 here
        got = imaging.decode(blob, 256, decoder)
        assert min(got.size) >= 256 and got.mode == "RGB"
        diff = np.abs(_crop(got) - full)
        if decoder in imaging.EXACT:
            assert diff.max() == 0 and got.size == source.size
        else:
            assert min(got.size) < min(source.size) or decoder == "pil-dct"  # Pillow: only halves
            assert diff.mean() < 2 * jpeg_error and np.quantile(diff, 0.99) < 0.2, (diff.mean(), np.quantile(diff, 0.99))


def test_default_is_exact():
    assert imaging.default_decoder() in imaging.EXACT


def test_full_size_without_min_side_and_other_formats_as_they_are(photos):
    source, blob = photos[0]
    for decoder in imaging.available_decoders():
        assert imaging.decode(blob, None, decoder).size == source.size
    grey = io.BytesIO()
    source.convert("L").save(grey, "JPEG", quality=90)
    assert imaging.decode(grey.getvalue(), 256).mode == "L"  # Pillow decides; hf_data converts
    png = io.BytesIO()
    source.save(png, "PNG")
    assert np.array_equal(np.asarray(imaging.decode(png.getvalue(), 256)), np.asarray(source))


def test_hf_open_uses_the_scaled_decode_for_bytes_and_paths(photos, tmp_path):
    source, blob = photos[1]
    path = tmp_path / "a.jpg"
    path.write_bytes(blob)
    from_bytes, from_path = _open({"bytes": blob, "path": None}, 256), _open({"bytes": None, "path": str(path)}, 256)
    assert from_bytes.mode == "RGB" and np.array_equal(np.asarray(from_bytes), np.asarray(from_path))
    assert min(from_bytes.size) >= 256


def test_decoder_chosen_by_environment(monkeypatch):
    monkeypatch.setenv("NGKIT_JPEG_DECODER", "pil-dct")
    assert imaging.default_decoder() == "pil-dct"
    monkeypatch.setenv("NGKIT_JPEG_DECODER", "libjpeg9")
    with pytest.raises(ValueError, match="NGKIT_JPEG_DECODER='libjpeg9' is not available here; choose one of"):
        imaging.default_decoder()


def test_data_benchmark_runs_every_decoder_and_source(tmp_path):
    out = tmp_path / "data.json"
    # without this process's launcher variables: a test before may have made a process group here
    env = child_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(BENCH), "--dir", str(tmp_path / "jpegs"), "--images", "12", "--batch", "4",
           "--batches", "2", "--repeats", "1", "--workers", "0", "1", "--gpu-images-per-s", "1000", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["images"]["count"] == 12 and 20 < report["images"]["mean_kb"] < 400
    rows = report["rows"]
    expected = {(d, s, w) for d in imaging.available_decoders() for s in ("folder", "parquet") for w in (0, 1)}
    assert {(r["decoder"], r["source"], r["workers"]) for r in rows} == expected
    assert all(r["images"] == 8 for r in rows)
    assert all(r["images_per_cpu_s"] > 0 for r in rows if r["workers"] == 0)
    assert all(r["images_per_worker_cpu_s_lower_bound"] > 0 for r in rows if r["workers"] == 1)
    assert "cores per GPU" in proc.stdout
    shapes = [Image.open(p).size for p in sorted((tmp_path / "jpegs" / "folder").rglob("*.jpg"))]
    assert len(shapes) == 12 and all(400 <= min(s) <= 500 for s in shapes)


def _bicubic_matrix(in_size: int, in0: float, in1: float, out_size: int) -> np.ndarray:
    """Pillow's antialiased bicubic (a = -0.5, support 2 x the reduction) as a float64 matrix
    [out, in] from the input interval [in0, in1): written from the filter's definition."""
    scale = (in1 - in0) / out_size
    stretch = max(scale, 1.0)
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        centre = in0 + (i + 0.5) * scale
        lo, hi = max(int(centre - 2 * stretch + 0.5), 0), min(int(centre + 2 * stretch + 0.5), in_size)
        x = np.abs((np.arange(lo, hi) - centre + 0.5) / stretch)
        w = np.where(x < 1, (1.5 * x - 2.5) * x * x + 1, np.where(x < 2, ((-0.5 * x + 2.5) * x - 4) * x + 2, 0.0))
        matrix[i, lo:hi] = w / w.sum()
    return matrix


def test_crop_is_a_faithful_bicubic_resampling_of_its_region(photos):
    """_resize_crop resamples only the crop (Pillow's box): against a float64 resampling of the
    same region of the full decode (one rounding at the end) it is off by what resizing the whole
    image then cropping is off by (Pillow's 8-bit intermediate image), and the two differ only
    in rare low bits."""
    size, rng = 256, np.random.default_rng(3)
    errors = {"box": [], "resize then crop": [], "between": []}
    for img, _ in photos:
        for _ in range(2):
            state = rng.bit_generator.state
            got = _resize_crop(img, size, rng, False).numpy().transpose(1, 2, 0).astype(np.float64)
            rng2 = np.random.default_rng()
            rng2.bit_generator.state = state
            w, h = img.size
            scale = size / min(w, h)
            out_w, out_h = max(size, round(w * scale)), max(size, round(h * scale))
            left, top = int(rng2.integers(0, out_w - size + 1)), int(rng2.integers(0, out_h - size + 1))
            whole = np.asarray(img.resize((out_w, out_h), Image.BICUBIC).crop((left, top, left + size, top + size)),
                               np.float64)
            ky = _bicubic_matrix(h, top * h / out_h, (top + size) * h / out_h, size)
            kx = _bicubic_matrix(w, left * w / out_w, (left + size) * w / out_w, size)
            exact = np.einsum("yi,ijc->yjc", ky, np.asarray(img, np.float64), optimize=True)
            exact = np.clip(np.floor(np.einsum("xj,yjc->yxc", kx, exact, optimize=True) + 0.5), 0, 255)
            for name, diff in (("box", got - exact), ("resize then crop", whole - exact), ("between", got - whole)):
                errors[name].append(np.abs(diff))
    mean = {k: float(np.mean(v)) for k, v in errors.items()}
    worst = {k: float(np.max(v)) for k, v in errors.items()}
    assert mean["box"] <= 1.05 * mean["resize then crop"] + 1e-3 and mean["box"] < 0.3, mean
    assert worst["box"] <= max(worst["resize then crop"], 4), worst
    assert mean["between"] < 0.05 and worst["between"] <= 4, (mean, worst)
