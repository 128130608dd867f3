"""One live run per run directory: a lock file rank 0 holds while it trains.

Two ``ngkit run`` into the same ``--out`` (or a ``--resume`` of a run still training) would
interleave their metrics and checkpoints. Rank 0 creates ``RUN/.ngkit-lock`` with ``O_EXCL``
(atomic on local disks and NFS v3+) holding its PID and host, and removes it when training ends,
however it ends. A lock left by a process that is gone (same host, PID not alive) is taken over
with a warning; one held from another host is refused, since its PID cannot be checked from here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ngkit.engine.checkpoint import LOCK_NAME, newest_complete, refuse_symlinks
from ngkit.errors import NgkitError, RunStopped

F = TypeVar("F", bound=Callable[..., Any])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _holder(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def acquire(run_dir: Path) -> Path:
    """Create the lock of ``run_dir`` for this process, or raise naming the run that holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            held = _holder(path)
            pid, host = held.get("pid"), held.get("host")
            ours = host == me["host"] and isinstance(pid, int)
            if ours and (pid == me["pid"] or not _alive(pid)):
                warnings.warn(f"{path}: taking over the lock of ngkit process {pid} on {host}, which is gone", stacklevel=3)
                path.unlink(missing_ok=True)
                continue
            if not held:  # being written this instant, or damaged: look again
                time.sleep(0.2)
                if not _holder(path):
                    raise NgkitError(f"{path} exists but is unreadable; if no ngkit run uses {run_dir}, delete it")
                continue
            raise NgkitError(
                f"{run_dir} is in use by another ngkit run (PID {pid} on host {host}, since {held.get('since')}); "
                f"wait for it to finish or stop it, or choose another --out. If that process is gone (a node "
                f"that crashed), delete {path}"
            )
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise NgkitError(f"could not take the lock {path}; another run keeps recreating it")


def release(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    held = _holder(path)
    if held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def holding(run_dir: Path, rank: int) -> Iterator[None]:
    """Refuse symlinked artifacts, then hold ``run_dir``'s lock on rank 0 (other ranks do not lock)."""
    refuse_symlinks(run_dir)
    if rank != 0:
        yield
        return
    created = not run_dir.exists()
    path = acquire(run_dir)
    try:
        yield
    finally:
        release(path)
        if created and not any(run_dir.iterdir()):  # a run that failed before writing anything
            run_dir.rmdir()


def launcher_rank() -> int:
    """This process's rank as its launcher set it (0 for a plain process)."""
    from ngkit.engine.distributed import launcher_env

    return int(launcher_env().get("RANK", "0"))


def interrupted(out_dir: Path) -> RunStopped:
    """What Ctrl-C outside the steps (whose SIGINT saves and stops, see ngkit.engine.signals) says."""
    newest = newest_complete(out_dir / "checkpoints")
    where = (f"the newest complete checkpoint is {out_dir / 'checkpoints' / newest}; evaluate it with ngkit eval "
             f"{out_dir}, or continue with ngkit run --resume {out_dir}") if newest else "no checkpoint was saved"
    return RunStopped(f"interrupted (SIGINT); {where}", exit_code=130)


def holds_run_dir(train: F) -> F:
    """Decorates ``train(recipe, out_dir, ...)``: the whole call holds ``out_dir``'s lock, and
    Ctrl-C outside the training steps ends with a message naming the newest checkpoint."""

    @functools.wraps(train)
    def locked(recipe: Any, out_dir: Path, *args: Any, **kwargs: Any) -> Any:
        with holding(Path(out_dir), launcher_rank()):
            try:
                return train(recipe, out_dir, *args, **kwargs)
            except KeyboardInterrupt:  # Ctrl-C outside the training steps (build, final evaluation)
                raise interrupted(Path(out_dir)) from None

    return locked  # type: ignore[return-value]
