"""Cost of the SHA-256 check that loading a checkpoint now does, next to the load itself.

    python scripts/bench_checkpoint_hash.py RUN_DIR     # e.g. a quickstart run

Prints the checkpoint's size, the time to hash every file (complete.json's check) and the time
of the weights-only load of the model states, best of 5 (files in the page cache)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ngkit.engine import checkpoint, safe_load
from ngkit.weights import sha256_of


def best(fn, repeats: int = 5) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(run: Path) -> None:
    ckpt_dir = run / "checkpoints"
    tag = checkpoint.newest_complete(ckpt_dir)
    path = ckpt_dir / tag
    size = sum(p.stat().st_size for p in path.iterdir())
    hashing = best(lambda: [sha256_of(p) for p in path.iterdir() if p.name != checkpoint.MARKER])
    verify = best(lambda: checkpoint.verify(path))
    states = path / "mp_rank_00_model_states.pt"
    load = best(lambda: safe_load.safe_torch_load(states, "cpu", deepspeed=True))
    print(f"{path}: {size / 2**20:.1f} MiB")
    print(f"sha256 of every file: {hashing * 1e3:.1f} ms ({size / 2**20 / hashing:.0f} MiB/s); verify(): {verify * 1e3:.1f} ms")
    print(f"weights-only load of {states.name}: {load * 1e3:.1f} ms")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
