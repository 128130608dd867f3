"""Atomic, verifiable checkpoints.

Every rank writes its DeepSpeed shards and its own ``rank-R.pt`` (data position and random
number generators) into a temporary directory; when all have finished, rank 0 writes a
completeness marker (``complete.json``: step, world size, the files and their sizes), renames the
directory into place and replaces ``latest``. A crash mid-save leaves the previous checkpoint
untouched, and ``--resume`` takes the newest checkpoint whose marker and files check out,
reporting the ones it skips.

The run directory must be on a filesystem that every rank sees (NFS, Lustre, a shared volume):
:func:`check_shared_dir` refuses node-local disks at start-up, before anything is trained.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

from ngkit.engine.distributed import all_ranks_agree, barrier
from ngkit.errors import NgkitError

LATEST = "latest"
MARKER = "complete.json"


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def rank_file(rank: int) -> str:
    return f"rank-{rank}.pt"


def check_shared_dir(out_dir: Path, rank: int) -> None:
    """Every rank must see the files rank 0 writes into ``out_dir`` (checkpoints are renamed by
    rank 0 only); raises on every rank otherwise."""
    probe = out_dir / ".ngkit-shared-probe"
    token = uuid.uuid4().hex
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(probe, token)
    token_list = [token]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(token_list, src=0)
    try:
        seen = probe.read_text() == token_list[0]
    except OSError:
        seen = False
    if not all_ranks_agree(seen)[0]:
        raise NgkitError(
            f"the run directory {out_dir} is not shared by all ranks (a node-local disk?): rank 0 wrote "
            f"{probe.name} there and some rank cannot read it. Put --out on a filesystem every node mounts "
            f"at the same path (NFS, Lustre, a shared volume)"
        )
    barrier()
    if rank == 0:
        probe.unlink(missing_ok=True)


def _file_sizes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def save(
    engine: Any, ckpt_dir: Path, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
    rank: int, world_size: int, keep: int,
) -> Path:
    """Save a DeepSpeed checkpoint for ``step`` plus this rank's own state; returns its directory."""
    tag, tmp_tag = step_tag(step), f".tmp-{step_tag(step)}"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(ckpt_dir / tmp_tag, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    torch.save(rank_state, ckpt_dir / tmp_tag / rank_file(rank))
    barrier()
    final = ckpt_dir / tag
    if rank == 0:
        files = _file_sizes(ckpt_dir / tmp_tag)
        marker = {"step": step, "world_size": world_size, "files": files}
        write_text_atomic(ckpt_dir / tmp_tag / MARKER, json.dumps(marker, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(ckpt_dir / tmp_tag, final)
        write_text_atomic(ckpt_dir / LATEST, tag)
        prune(ckpt_dir, keep)
    barrier()
    return final


def problem(path: Path) -> str | None:
    """Why the checkpoint directory ``path`` cannot be trusted, or None when it checks out."""
    marker = path / MARKER
    if not marker.is_file():
        return "no completeness marker (the save did not finish)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"its {MARKER} is unreadable"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def _step_tags(ckpt_dir: Path) -> list[str]:
    """Tags of the step directories in ``ckpt_dir``, newest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p.name for p in ckpt_dir.glob("step-*") if p.is_dir()), reverse=True)


def prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints (all when ``keep`` <= 0); incomplete ones do
    not count, so the newest complete one is never deleted."""
    if keep <= 0:
        return
    good = [t for t in _step_tags(ckpt_dir) if problem(ckpt_dir / t) is None]
    for tag in good[keep:]:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def latest_tag(ckpt_dir: Path) -> str | None:
    """The checkpoint to load: the newest complete one, warning about each newer one it skips
    (``latest`` is only a pointer for people)."""
    for tag in _step_tags(ckpt_dir):
        why = problem(ckpt_dir / tag)
        if why is None:
            return tag
        warnings.warn(f"skipping checkpoint {ckpt_dir / tag}: {why}", stacklevel=2)
    return None


def load(engine: Any, ckpt_dir: Path, tag: str, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load weights, optimiser and scheduler state; returns the client state and this rank's state
    (None when the checkpoint was written by fewer ranks)."""
    try:
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    except Exception as exc:
        raise NgkitError(
            f"could not load checkpoint {ckpt_dir / tag} ({type(exc).__name__}: {exc}); move it aside to "
            f"resume from an older one"
        ) from exc
    if path is None:
        raise NgkitError(f"could not load checkpoint {ckpt_dir / tag}: DeepSpeed found no model states there")
    own = ckpt_dir / tag / rank_file(rank)
    try:
        rank_state = torch.load(own, weights_only=True) if own.exists() else None
    except Exception as exc:
        raise NgkitError(
            f"could not read {own} without unpickling it ({type(exc).__name__}: {exc}); a checkpoint of an "
            f"older ngkit? Resume from a newer checkpoint, or start a new run"
        ) from exc
    return client_state or {}, rank_state
