"""Writing a folder as a whole: an export is either the old one or the new one, never a mix.

Files are written into a hidden sibling folder, which then swaps places with the target in one
``renameat2(RENAME_EXCHANGE)`` (Linux >= 3.15); elsewhere the old folder is renamed aside first,
so a kill in between leaves the new folder under its temporary name and the old one aside, not a
mixture. ``config.json`` lists each file's SHA-256 as a second line of defence (``ngkit.load``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ngkit.errors import NgkitError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _check_target(out: Path, marker: str) -> None:
    if out.is_symlink():
        raise NgkitError(f"{out} is a symlink; export into a real folder (ngkit does not write through links)")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file())):
        raise NgkitError(
            f"{out} exists and is not an ngkit export folder (no {marker}); an export replaces its whole "
            f"folder, so choose a new or empty one with --out"
        )


@contextlib.contextmanager
def staged_dir(out: Path, marker: str = "config.json") -> Iterator[Path]:
    """Yield an empty temporary folder; when the block finishes, it replaces ``out`` as a whole.
    ``out`` must be new, empty or an earlier export (holding ``marker``)."""
    _check_target(out, marker)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if not out.exists():
            os.rename(tmp, out)
        elif _exchange(tmp, out):
            shutil.rmtree(tmp)  # now the old export
        else:
            aside = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, aside)
            os.rename(tmp, out)
            shutil.rmtree(aside)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
