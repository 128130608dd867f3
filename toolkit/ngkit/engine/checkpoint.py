"""Atomic, verifiable checkpoints.

Every rank writes its DeepSpeed shards and its own ``rank-R.pt`` (data position and random
number generators, as tensors and numbers only, so it loads with ``weights_only=True``) into a
temporary directory; when all have finished, rank 0 writes a completeness marker
(``complete.json``: step, world size, each file's size and SHA-256), renames the directory into
place and replaces ``latest``. A crash mid-save leaves the previous checkpoint untouched, and
``--resume`` takes the newest checkpoint whose marker and files check out, reporting the ones it
skips. A full disk stops the run with one message (:class:`DiskFull`); the partial directory is
removed. Every file is read back with :mod:`ngkit.engine.safe_load` (no unpickling of code).

The run directory must be on a filesystem that every rank sees (NFS, Lustre, a shared volume):
:func:`check_shared_dir` refuses node-local disks at start-up, before anything is trained.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

from ngkit.engine import safe_load
from ngkit.engine.distributed import all_ranks_agree, barrier
from ngkit.errors import NgkitError, TrainingError, WeightsError
from ngkit.weights import sha256_of

LATEST = "latest"
MARKER = "complete.json"
LOCK_NAME = ".ngkit-lock"  # see ngkit.engine.lock


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


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


class DiskFull(TrainingError):
    """A checkpoint could not be written for lack of space; the previous ones are intact."""


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` via a fresh temporary file (never through a symlink planted
    at the temporary name: it is removed and the file created with O_EXCL | O_NOFOLLOW)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def remove(path: Path) -> None:
    """Delete a file, a directory tree or a symlink (the link itself, never what it points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def _listing(directory: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``directory`` -> its size in bytes and SHA-256."""
    return {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
        for p in sorted(directory.rglob("*")) if p.is_file() and not p.is_symlink()
    }


# ---- per-rank state: numbers and tensors only, so that it loads with weights_only=True
def encode_rank_state(state: dict[str, Any]) -> dict[str, Any]:
    """``rank-R.pt`` contents: numpy's generator state (a tuple holding a uint32 array, which a
    weights-only load refuses) becomes a dict of an int64 tensor and numbers."""
    rng = dict(state["rng"])
    algorithm, key, pos, has_gauss, cached = rng["numpy"]
    rng["numpy"] = {"algorithm": str(algorithm), "key": torch.from_numpy(key.astype("int64")), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    version, internal, gauss = rng["python"]
    rng["python"] = [int(version), [int(v) for v in internal], gauss]
    return {**state, "rng": rng}


def decode_rank_state(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`encode_rank_state`: generator states as numpy/random take them."""
    import numpy as np

    rng = dict(state["rng"])
    npy = rng["numpy"]
    rng["numpy"] = (npy["algorithm"], npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                    npy["cached_gaussian"])
    version, internal, gauss = rng["python"]
    rng["python"] = (version, tuple(internal), gauss)
    return {**state, "rng": rng}


# ---- disk space
def _caused_by_full_disk(exc: BaseException | None) -> bool:
    """ENOSPC/EDQUOT, or torch's zip writer's report of a short write (``inline_container.cc ...
    unexpected pos``), anywhere in the exception's chain."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if isinstance(exc, RuntimeError) and ("unexpected pos" in text or "No space left" in text or "file write failed" in text):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def needed_bytes(ckpt_dir: Path, engine: Any) -> int:
    """What the next save will take: the newest complete checkpoint's size, else four copies of the
    parameters (weights, fp32 master copy, Adam's two moments)."""
    for tag in _step_tags(ckpt_dir):
        files = _marker_files(ckpt_dir / tag)
        if isinstance(files, dict) and problem(ckpt_dir / tag, hashes=False) is None:
            return sum(int(v["bytes"] if isinstance(v, dict) else v) for v in files.values())
    return 4 * sum(p.numel() * p.element_size() for p in engine.module.parameters())


def disk_full(ckpt_dir: Path, step: int, needed: int) -> DiskFull:
    free = shutil.disk_usage(ckpt_dir if ckpt_dir.exists() else ckpt_dir.parent).free
    newest = newest_complete(ckpt_dir)
    where = f"the newest complete checkpoint is {ckpt_dir / newest}" if newest else "no complete checkpoint was saved yet"
    return DiskFull(
        f"the checkpoint of step {step} could not be written for lack of space in {ckpt_dir} ({free} bytes "
        f"free, about {needed} needed); training stopped and {where}. Free some space (or move the run), "
        f"then continue with: ngkit run --resume {ckpt_dir.parent}"
    )


def save(
    engine: Any, ckpt_dir: Path, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
    rank: int, world_size: int, keep: int,
) -> Path:
    """Save a DeepSpeed checkpoint for ``step`` plus this rank's own state; returns its directory.
    Raises :class:`DiskFull` (on every rank) when there is too little space, before or while writing."""
    tag, tmp_tag = step_tag(step), f".tmp-{step_tag(step)}"
    tmp, final = ckpt_dir / tmp_tag, ckpt_dir / tag
    needed = needed_bytes(ckpt_dir, engine)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        refuse_symlinks(ckpt_dir.parent)
        remove(tmp)
    room = rank != 0 or shutil.disk_usage(ckpt_dir).free >= needed
    if not all_ranks_agree(room)[0]:
        raise disk_full(ckpt_dir, step, needed)
    failure: BaseException | None = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
        torch.save(encode_rank_state(rank_state), tmp / rank_file(rank))
    except (OSError, RuntimeError) as exc:
        if not _caused_by_full_disk(exc):
            raise
        failure = exc
    if not all_ranks_agree(failure is None)[0]:  # also the barrier: every rank's files are written
        if rank == 0:
            remove(tmp)
        raise disk_full(ckpt_dir, step, needed) from failure
    if rank == 0:
        try:
            marker = {"step": step, "world_size": world_size, "files": _listing(tmp)}
            write_text_atomic(tmp / MARKER, json.dumps(marker, indent=1))
        except OSError as exc:
            if not _caused_by_full_disk(exc):
                raise
            failure = exc
    if not all_ranks_agree(failure is None)[0]:
        if rank == 0:
            remove(tmp)
        raise disk_full(ckpt_dir, step, needed) from failure
    if rank == 0:
        remove(final)
        os.replace(tmp, final)
        write_text_atomic(ckpt_dir / LATEST, tag)
        prune(ckpt_dir, keep)
    barrier()
    return final


# ---- reading back
ARTIFACTS = ("checkpoints", "metrics.jsonl", "recipe.toml", "specs.json", "summary.json", "curves.png",
             "reconstructions.png", LOCK_NAME)


def refuse_symlinks(run_dir: Path) -> None:
    """A run directory whose own files or checkpoint folders are symlinks is refused: ngkit's writes
    would land wherever they point."""
    names = [run_dir / name for name in ARTIFACTS]
    ckpt = run_dir / "checkpoints"
    if ckpt.is_dir() and not ckpt.is_symlink():
        names += sorted(ckpt.iterdir())
    links = [p for p in names if p.is_symlink()]
    if run_dir.is_symlink():
        links.insert(0, run_dir)
    if links:
        raise NgkitError(
            f"{run_dir}: {', '.join(str(p) for p in links[:5])} {'is a symlink' if len(links) == 1 else 'are symlinks'}; "
            f"ngkit does not write through symlinks in a run directory (it could overwrite other files). "
            f"Remove the links (or copy the run with cp -rL) and try again"
        )


def _marker_files(path: Path) -> Any:
    try:
        return json.loads((path / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _safe_name(name: str) -> bool:
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def problem(path: Path, hashes: bool = True) -> str | None:
    """Why the checkpoint directory ``path`` cannot be trusted, or None when it checks out: its
    marker lists every file in it, each with the size (and, if ``hashes``, SHA-256) written."""
    if not (path / MARKER).is_file():
        return "no completeness marker (the save did not finish)"
    files = _marker_files(path)
    if not isinstance(files, dict) or not all(isinstance(k, str) and _safe_name(k) for k in files):
        return f"its {MARKER} is unreadable"
    present = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() or p.is_symlink()} - {MARKER}
    unlisted = sorted(present - set(files))
    if unlisted:
        return f"it holds {', '.join(unlisted[:3])}, which its {MARKER} does not list"
    for name, entry in files.items():
        f = path / name
        if f.is_symlink() or not f.is_file():
            return f"{name} is missing" if not f.is_symlink() else f"{name} is a symlink"
        size, digest = (entry.get("bytes"), entry.get("sha256")) if isinstance(entry, dict) else (entry, None)
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
        if hashes and digest is not None and sha256_of(f) != digest:
            return f"{name} does not match the SHA-256 recorded in {MARKER} (changed or damaged)"
    return None


def verify(path: Path) -> None:
    """Raise a :class:`WeightsError` naming what is wrong with checkpoint ``path``, if anything."""
    why = problem(path)
    if why is not None:
        raise WeightsError(f"checkpoint {path} cannot be loaded: {why}; move it aside (or pass another step)")


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
    good = [t for t in _step_tags(ckpt_dir) if problem(ckpt_dir / t, hashes=False) is None]
    for tag in good[keep:]:
        remove(ckpt_dir / tag)


def newest_complete(ckpt_dir: Path) -> str | None:
    """The newest checkpoint whose marker and sizes check out, silently (for messages)."""
    return next((t for t in _step_tags(ckpt_dir) if problem(ckpt_dir / t, hashes=False) is None), None)


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
    (None when the checkpoint was written by fewer ranks). Every file is read weights-only."""
    verify(ckpt_dir / tag)
    safe_load.install(engine)
    try:
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    except NgkitError:
        raise
    except Exception as exc:
        raise NgkitError(
            f"could not load checkpoint {ckpt_dir / tag} ({type(exc).__name__}: {exc}); move it aside to "
            f"resume from an older one"
        ) from exc
    if path is None:
        raise NgkitError(f"could not load checkpoint {ckpt_dir / tag}: DeepSpeed found no model states there")
    own = ckpt_dir / tag / rank_file(rank)
    if not own.exists():
        return client_state or {}, None
    try:
        return client_state or {}, decode_rank_state(safe_load.safe_torch_load(own))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise WeightsError(f"{own} is not a rank state written by this ngkit ({type(exc).__name__}: {exc})") from exc


def convert_trusted(ckpt_dir: Path) -> list[str]:
    """Rewrite the checkpoints of a run written by an older ngkit (``rank-R.pt`` pickled with
    numpy objects, ``complete.json`` without hashes) so that they load weights-only. This
    UNPICKLES the old rank files, running any code they hold: only for a run the user made.
    Returns one line per checkpoint said what was done."""
    report = []
    for tag in sorted(_step_tags(ckpt_dir)):
        path = ckpt_dir / tag
        if problem(path, hashes=False) is not None:
            report.append(f"{tag}: skipped ({problem(path, hashes=False)})")
            continue
        rewritten = []
        for own in sorted(path.glob("rank-*.pt")):
            try:
                safe_load.safe_torch_load(own)
                continue
            except WeightsError:
                state = torch.load(own, map_location="cpu", weights_only=False)  # trusted by the user
            if not isinstance(state.get("rng", {}).get("numpy"), dict):
                state = encode_rank_state(state)
            tmp = own.with_name(f".{own.name}.tmp-{os.getpid()}")
            torch.save(state, tmp)
            os.replace(tmp, own)
            rewritten.append(own.name)
        for states in sorted(set(path.glob("*_states.pt"))):
            safe_load.safe_torch_load(states, "cpu", deepspeed=True)  # DeepSpeed's own files must pass as they are
        marker = json.loads((path / MARKER).read_text())
        marker["files"] = _listing(path)
        marker["files"].pop(MARKER, None)
        write_text_atomic(path / MARKER, json.dumps(marker, indent=1))
        report.append(f"{tag}: {', '.join(rewritten) or 'no rank file'} rewritten, {MARKER} now records SHA-256")
    return report
