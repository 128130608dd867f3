"""Training throughput on one rank against two, at the same global batch (CPU, gloo).

    python benchmarks/ranks.py [RECIPE] [--steps 60] [--batch 32] [--set key=value ...]

Runs ``ngkit run`` three ways: one rank with 2 threads, one rank with 1 thread, two ranks
(``torchrun``) with 1 thread each and half the batch each; prints images/s (global images,
median of the logged windows after the first) and the two-rank speed-up.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "toolkit"))
from ngkit.engine.artifacts import read_jsonl  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(recipe: str, out: Path, ranks: int, threads: int, batch: int, steps: int, extra: list[str]) -> float:
    sets = [f"data.batch_size={batch // ranks}", f"run.steps={steps}", "run.log_every=10", "run.eval_every=0",
            "run.checkpoint_minutes=0", "eval.num_images=64", *extra]
    cli = ["-m", "ngkit.cli.main", "run", recipe, "--out", str(out), "--quiet"] + [a for s in sets for a in ("--set", s)]
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu"}
    subprocess.run([sys.executable, *launcher, *cli], env=env, check=True, capture_output=True)
    rates = [r["images_per_s"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"][1:]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", default="recipes/quickstart.toml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--set", dest="extra", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(ranks, threads, run(args.recipe, Path(tmp) / f"r{ranks}t{threads}", ranks, threads, args.batch,
                                     args.steps, args.extra)) for ranks, threads in ((1, 2), (1, 1), (2, 1))]
    print("| ranks | threads per rank | global batch | images/s |\n|---|---|---|---|")
    for ranks, threads, rate in rows:
        print(f"| {ranks} | {threads} | {args.batch} | {rate:.1f} |")
    print(f"\ntwo ranks / one rank (2 threads): {rows[2][2] / rows[0][2]:.2f}x; "
          f"two ranks / one rank (1 thread): {rows[2][2] / rows[1][2]:.2f}x")


if __name__ == "__main__":
    main()
