"""Time one full training step of a recipe's method (forward, backward, AdamW, after_step),
without DeepSpeed or data loading, and print the split.

    python benchmarks/train_step.py recipes/quickstart.toml [--set key=value ...] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ngkit.engine.build import build
from ngkit.recipe import load_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="dotted.key=value")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    recipe = load_recipe(args.recipe, args.overrides)
    built = build(recipe)
    method = built.method
    optimizer = torch.optim.AdamW(method.parameters(), lr=recipe.optim.lr)
    stream = iter(built.dataset.train(seed=0, epoch=0, shard=0, num_shards=1))
    x = torch.stack([next(stream).load() for _ in range(recipe.data.batch_size)])

    phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "after_step": []}
    for step in range(1, args.repeats + 2):
        t0 = time.perf_counter()
        out = method(x, step)
        t1 = time.perf_counter()
        optimizer.zero_grad()
        out.loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        method.after_step(step)
        t4 = time.perf_counter()
        if step > 1:  # the first step warms up allocators and kernels
            for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[name].append(dt * 1000)
    medians = {name: statistics.median(v) for name, v in phases.items()}
    print(f"{args.recipe} {' '.join(args.overrides)} | method {recipe.method.name} | batch {recipe.data.batch_size} "
          f"| threads {args.threads} | median of {args.repeats}")
    for name, ms in medians.items():
        print(f"  {name:>10}: {ms:8.1f} ms")
    print(f"  {'step':>10}: {sum(medians.values()):8.1f} ms")


if __name__ == "__main__":
    main()
