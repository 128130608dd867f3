"""Scaling tables of the training step: ``ngkit bench`` over K, tokens per image and batch.

    .venv/bin/python benchmarks/scaling.py recipes/quickstart.toml --threads 1 [--steps 10] [--table K]

Each row is one ``ngkit bench`` of the recipe with one setting changed (``--set`` style), in
this process; prints Markdown tables (numbers in docs/performance.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ngkit.engine.bench import bench
from ngkit.recipe import apply_overrides, parse_recipe, read_toml

TABLES: dict[str, list[tuple[str, list[str]]]] = {
    "K": [(f"K = {k}", [f"method.samples={k}"]) for k in (2, 4, 8, 16)],
    "tokens": [
        ("16 tokens (32 px, patch 8)", ["model.patch_size=8"]),
        ("64 tokens (32 px, patch 4)", ["model.patch_size=4"]),
        ("256 tokens (32 px, patch 2)", ["model.patch_size=2"]),
        ("1024 tokens (64 px, patch 2)", ["model.patch_size=2", "data.crop=64"]),
    ],
    "batch": [(f"batch {b}", [f"data.batch_size={b}"]) for b in (8, 16, 32, 64)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--table", choices=sorted(TABLES), action="append", help="default: all")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: this process's CPU time")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="dotted.key=value for every row")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.table or list(TABLES):
        print(f"\n{args.recipe} {' '.join(args.overrides)}: step time against {name} "
              f"(median of {args.steps} steps, {torch.get_num_threads()} thread(s), {args.clock} clock)\n")
        print("| setting | step ms | floor ms | step / floor | images/s | peak RSS MiB |\n|---|---|---|---|---|---|")
        for label, sets in TABLES[name]:
            raw = apply_overrides(read_toml(Path(args.recipe)), [*args.overrides, *sets], args.recipe)
            report = bench(parse_recipe(raw, args.recipe), args.recipe, args.steps, args.warmup, None, args.clock)
            t = report.timing
            floor = f"{t.floor_ms:.1f} | {t.step_over_floor:.2f}" if t.floor_ms else "– | –"
            print(f"| {label} | {t.step_ms:.1f} | {floor} | {t.images_per_s:.1f} | {report.peak_rss_mb:.0f} |", flush=True)


if __name__ == "__main__":
    main()
