"""Can the data pipeline feed a GPU? Images/s per worker core through the real ``hf`` dataset path
(``ngkit.data.TrainBatches`` over ``ngkit_plugins.hf_data.HFImages``: decode, shorter side to 256
bicubic, random 256 crop, flip), for each JPEG decoder of :mod:`ngkit.imaging`.

Synthetic ImageNet-like JPEGs (shorter side 400-500 px, 4:3 / 3:2 / square, quality 90, 4:2:0:
smooth multi-scale colour fields, hard-edged shapes and grain, so that they compress like photos
rather than like flat colour or white noise) are written once to an image folder and to parquet
shards under ``--dir``, then read back by each configuration:

    .venv/bin/python benchmarks/data.py --dir /tmp/ngkit-jpegs --workers 0 2

``--workers 0`` decodes in this process and reports images per CPU second (``process_time``: on a
shared machine, what one worker core delivers); more workers report wall-clock images/s and the
CPU seconds their processes used (``RUSAGE_CHILDREN``). ``--gpu-images-per-s`` turns the per-core
figure into the cores one GPU needs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SIZE = 256  # the recipe's crop (recipes/imagenet256.toml [data] image_size)
QUALITY = 90
SHAPES = [(4, 3), (3, 2), (1, 1)]  # width:height of typical ImageNet photos (500x375, 500x333)


def synthetic_photo(rng: np.random.Generator) -> Image.Image:
    """One photo-like RGB image: shorter side 400-500 px, either orientation."""
    short = int(rng.integers(400, 501))
    a, b = SHAPES[rng.integers(len(SHAPES))]
    w, h = round(short * a / b), short
    if rng.random() < 0.3:
        w, h = h, w
    field = np.zeros((h, w, 3), np.float32)
    for cells, amplitude in ((3, 1.0), (12, 0.45), (48, 0.25), (160, 0.15)):  # smooth at four scales
        for c in range(3):
            small = rng.normal(size=(cells, max(2, cells * w // h))).astype(np.float32)
            field[..., c] += amplitude * np.asarray(Image.fromarray(small, "F").resize((w, h), Image.BICUBIC))
    field = (field - field.min()) / (np.ptp(field) + 1e-6)
    img = Image.fromarray((field * 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 16))):  # hard edges: objects against the background
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon([(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(4)], fill=colour)
    arr = np.asarray(img, np.float32) + rng.normal(0, 10, (h, w, 3))  # grain, as a sensor leaves
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def write_images(root: Path, count: int, shards: int = 4, seed: int = 0) -> dict[str, Any]:
    """``count`` JPEGs into ``root/folder/train/synthetic/`` and the same bytes into
    ``root/parquet/train-XXXXX-of-YYYYY.parquet``; kept when already there."""
    import datasets

    folder, parquet = root / "folder" / "train" / "synthetic", root / "parquet"
    done = root / "done.json"
    if done.exists() and json.loads(done.read_text()).get("count") == count:
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    parquet.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        path = folder / f"img_{i:06d}.jpg"
        synthetic_photo(rng).save(path, quality=QUALITY, subsampling="4:2:0")
        rows.append({"bytes": path.read_bytes(), "path": path.name})
    features = datasets.Features({"image": datasets.Image(decode=False)})
    for s in range(shards):
        part = datasets.Dataset.from_dict({"image": rows[s::shards]}, features=features)
        part.to_parquet(str(parquet / f"train-{s:05d}-of-{shards:05d}.parquet"))
    sizes = [len(r["bytes"]) for r in rows]
    info = {"count": count, "mean_kb": float(np.mean(sizes)) / 1024, "shards": shards}
    done.write_text(json.dumps(info))
    return info


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def measure(root: Path, source: str, decoder: str, workers: int, batch: int, batches: int) -> dict[str, Any]:
    """Read ``batches`` batches through TrainBatches + HFImages with ``decoder``; a fresh loader
    each time (its workers exit at the end, so their CPU time is counted)."""
    from ngkit.data import TrainBatches
    from ngkit_plugins.hf_data import HFImages

    os.environ["NGKIT_JPEG_DECODER"] = decoder  # read by ngkit.imaging, in the workers too
    if source == "folder":
        dataset = HFImages(path="imagefolder", data_dir=str(root / "folder"), image_size=SIZE)
    else:
        dataset = HFImages(path="parquet", data_dir=str(root / "parquet"), image_size=SIZE)
    stream = TrainBatches(dataset, batch, seed=0, rank=0, world=1, workers=workers)
    next(stream)  # start-up (dataset load, worker start) is not throughput
    own0, kids0 = _cpu_seconds()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    images = sum(len(next(stream)) for _ in range(batches))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    del stream  # its workers exit here
    own1, kids1 = _cpu_seconds()
    out = {"source": source, "decoder": decoder, "workers": workers, "images": images,
           "wall_images_per_s": images / wall}
    if workers == 0:
        out["images_per_cpu_s"] = images / cpu  # one core's worth
    else:
        # the workers' CPU includes their start and the prefetched batches not consumed: a lower bound
        out["worker_cpu_s"] = kids1 - kids0
        out["images_per_worker_cpu_s_lower_bound"] = images / max(kids1 - kids0, 1e-9)
    return out


def decode_only(root: Path, decoder: str, count: int) -> float:
    """Images per CPU second of decode + resize + crop alone (no datasets, no batching)."""
    from ngkit.imaging import decode
    from ngkit_plugins.hf_data import _resize_crop

    files = sorted((root / "folder" / "train" / "synthetic").glob("*.jpg"))[:count]
    data = [f.read_bytes() for f in files]
    rng = np.random.default_rng(0)
    start = time.process_time()
    for blob in data:
        _resize_crop(decode(blob, SIZE, decoder).convert("RGB"), SIZE, rng, True)
    return len(data) / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ngkit-jpegs"), help="where the JPEGs are written once")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per configuration")
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument("--sources", nargs="+", choices=["folder", "parquet"], default=["folder", "parquet"])
    parser.add_argument("--decoders", nargs="+", help="default: every installed one")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many per configuration")
    parser.add_argument("--gpu-images-per-s", type=float, help="one GPU's training images/s, for cores per GPU")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    from ngkit.imaging import available_decoders

    torch.set_num_threads(1)
    decoders = args.decoders or available_decoders()
    info = write_images(args.dir, args.images)
    print(f"{info['count']} synthetic JPEGs, mean {info['mean_kb']:.0f} KiB, in {args.dir}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rows = []
    for decoder in decoders:
        alone = max(decode_only(args.dir, decoder, min(128, args.images)) for _ in range(args.repeats))
        for source in args.sources:
            for workers in args.workers:
                runs = [measure(args.dir, source, decoder, workers, args.batch, args.batches) for _ in range(args.repeats)]
                key = "images_per_cpu_s" if workers == 0 else "images_per_worker_cpu_s_lower_bound"
                best = max(runs, key=lambda r: r[key])
                best["decode_resize_crop_per_cpu_s"] = alone
                rows.append(best)
                per_core = best[key]
                cores = f", {args.gpu_images_per_s / per_core:.1f} cores per GPU" if args.gpu_images_per_s else ""
                print(f"{decoder:10s} {source:8s} workers {workers}: {per_core:6.0f} images per core-second "
                      f"(decode+resize+crop alone {alone:.0f}), wall {best['wall_images_per_s']:.0f} images/s{cores}")
    if args.json:
        args.json.write_text(json.dumps({"images": info, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
