"""Held-out reconstruction of the EMA weights against the raw weights of one training run.

    OMP_NUM_THREADS=1 python benchmarks/ema_vs_raw.py recipes/quickstart.toml --steps 400 --ema 0.999

Trains the recipe once with ``[run] ema`` on (the average does not change training), exports
both weight sets and prints, per weight set, the mean held-out MSE and PSNR over the test
images, and the paired difference EMA - raw with its standard error over images (the noise).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import ngkit
from ngkit.data import test_batches
from ngkit.engine.build import build_dataset
from ngkit.engine.train_loop import train
from ngkit.export import export
from ngkit.recipe import load_recipe


def per_image_mse(tok: ngkit.tokenizer.Tokenizer, images: torch.Tensor) -> torch.Tensor:
    return (tok.decode(tok.encode(images)) - images).square().flatten(1).mean(1).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=256, help="held-out images compared")
    parser.add_argument("--out", type=Path, default=Path("runs/ema-vs-raw"))
    args = parser.parse_args()
    overrides = [f"run.steps={args.steps}", f"run.ema={args.ema}", f"run.seed={args.seed}", "run.eval_every=0",
                 'eval.metrics=["mse"]', "eval.num_images=16"]
    recipe = load_recipe(args.recipe, overrides)
    out = args.out / f"{args.recipe.stem}-seed{args.seed}"
    train(recipe, out, quiet=True)
    images = torch.cat(list(test_batches(build_dataset(recipe), 64, 0, 1, args.images)))
    mse = {}
    for weights in ("ema", "raw"):
        export(out, out / f"export-{weights}", weights=weights)
        mse[weights] = per_image_mse(ngkit.load(out / f"export-{weights}"), images)
    diff = mse["ema"] - mse["raw"]
    n = len(diff)
    print(f"{args.recipe} seed {args.seed}: {args.steps} steps, ema {args.ema}, {n} held-out images")
    for weights, values in mse.items():
        psnr = (10 * torch.log10(1 / values)).mean()
        print(f"  {weights:3s}: mse {values.mean():.6f}  psnr {psnr:.3f} dB")
    se = diff.std() / math.sqrt(n)
    print(f"  ema - raw: mse {diff.mean():+.6f} (standard error {se:.6f}; {diff.mean() / se:+.2f} SE)")


if __name__ == "__main__":
    main()
