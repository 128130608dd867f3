"""How far per-token credit's patch reward is from exact: the share of a token's effect on the
decoder's log-likelihood that lands outside its own patch (docs/daps.md, "Per-token credit").

For held-out images and their argmax codes, each token in turn is replaced by another code
(uniformly drawn); the per-patch log-likelihoods before and after give |Δr_l| for every patch l.
``outside`` = Σ_{l≠j} |Δr_l| / Σ_l |Δr_l|, pooled over tokens j and images: 0 means each token
changes only its own patch (the patch reward is then the exact additive credit), 1 - 1/L means a
token's change is spread evenly over the image. A conv decoder's receptive field overlaps its
neighbours' patches; an MLP decoder's is the whole image.

Run (figures in docs/experiments.md, experiment 9):
    .venv/bin/python benchmarks/token_credit_leakage.py runs/compare-photos/daps-na-seed0 --images 64
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import ngkit
from ngkit.engine.build import build_dataset
from ngkit.recipe import load_recipe
from ngkit_plugins.daps_proxy import patch_rewards


@torch.no_grad()
def leakage(run: Path, images: int, seed: int = 0) -> dict[str, float]:
    method = ngkit.load(run).method
    recipe = load_recipe(run / "recipe.toml")
    x = torch.stack(list(build_dataset(recipe).test(shard=0, num_shards=1, limit=images)))
    decoder, grid, codes = method.decoder, method.latent.grid, method.latent.codes

    def rewards(z: torch.Tensor) -> torch.Tensor:
        return patch_rewards(decoder.pixel_log_prob(x, decoder(decoder.embed(z))).double(), grid)

    z = method.encode(x)
    base = rewards(z)
    g = torch.Generator().manual_seed(seed)
    own = total = 0.0
    for j in range(z.shape[1]):
        swapped = z.clone()
        swapped[:, j] = (z[:, j] + torch.randint(1, codes, (len(z),), generator=g)) % codes
        delta = (rewards(swapped) - base).abs()  # [B, L]
        own += float(delta[:, j].sum())
        total += float(delta.sum())
    return {"outside": 1 - own / total, "uniform_spread": 1 - 1 / z.shape[1], "images": float(len(x))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a run directory (its latest checkpoint)")
    parser.add_argument("--images", type=int, default=64, help="held-out images")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = leakage(args.run, args.images)
    print(f"{args.run}: share of a token's effect outside its own patch {out['outside']:.3f} "
          f"(evenly spread: {out['uniform_spread']:.3f}; {int(out['images'])} held-out images)")


if __name__ == "__main__":
    main()
