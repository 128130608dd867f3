"""Atomic checkpoints: DeepSpeed writes into a temporary directory that is renamed into place
only when every rank has finished, and ``latest`` is replaced atomically. A crash mid-save
leaves the previous checkpoint untouched."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ngkit.engine.distributed import barrier
from ngkit.errors import NgkitError

LATEST = "latest"


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict[str, Any], rank: int, keep: int) -> Path:
    """Save a DeepSpeed checkpoint for ``step``; returns its final directory."""
    tag, tmp_tag = step_tag(step), f".tmp-{step_tag(step)}"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(ckpt_dir / tmp_tag, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    barrier()
    final = ckpt_dir / tag
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(ckpt_dir / tmp_tag, final)
        write_text_atomic(ckpt_dir / LATEST, tag)
        old = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
        for stale in old[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def latest_tag(ckpt_dir: Path) -> str | None:
    marker = ckpt_dir / LATEST
    if not marker.exists():
        return None
    tag = marker.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise NgkitError(
            f"{marker} names checkpoint {tag!r}, which is missing from {ckpt_dir}; "
            f"write the name of an existing step-* directory into {marker}"
        )
    return tag


def load(engine: Any, ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Load weights, optimiser and scheduler state; returns the client state saved with them."""
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise NgkitError(f"could not load checkpoint {ckpt_dir / tag}: DeepSpeed found no model states there")
    return client_state or {}

