"""Names and paths a recipe may set stay where they belong.

A recipe that travels must not write outside the directory it is run in: names joined onto a
directory (compare variants, run names) are single plain path components, and paths a recipe
sets for writing (``[run] out_dir``, DeepSpeed's monitor and offload paths) are relative and
never climb with ``..``. A run that should live elsewhere is given ``--out`` on the command line.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,99}")
# Keys of a DeepSpeed config whose values are files or folders DeepSpeed writes (monitors,
# profiler, NVMe offload swap space).
PATH_KEYS = re.compile(r"(^|_)(path|file|dir|folder)$|nvme")


def name_problem(name: Any, what: str) -> str | None:
    """Why ``name`` cannot be a directory name ngkit makes, or None."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in (".", ".."):
        return (
            f"{what} {name!r} is not a plain name: use letters, digits and . _ + = - (at most 100, "
            f"starting with a letter or digit; no / \\ or ..), since it becomes a directory name"
        )
    return None


def relative_problem(path: Any, what: str) -> str | None:
    """Why ``path`` may not be a place a recipe writes to, or None."""
    if not isinstance(path, str) or not path.strip():
        return f"{what} must be a non-empty relative path, found {path!r}"
    posix, windows = PurePosixPath(path), PureWindowsPath(path)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or path.startswith("~"):
        return (
            f"{what} = {path!r} is absolute; a recipe writes only below the directory it runs in "
            f"(pass a directory elsewhere with --out on the command line)"
        )
    if ".." in posix.parts or ".." in windows.parts:
        return f"{what} = {path!r} climbs out with '..'; a recipe writes only below the directory it runs in"
    return None


def deepspeed_path_problems(config: Any, where: str = "distributed.deepspeed") -> list[str]:
    """Every path-like value in ``[distributed.deepspeed]`` that points outside (see PATH_KEYS)."""
    problems: list[str] = []
    if isinstance(config, dict):
        for key, value in config.items():
            at = f"{where}.{key}"
            if isinstance(value, (dict, list)):
                problems += deepspeed_path_problems(value, at)
            elif isinstance(key, str) and PATH_KEYS.search(key.lower()) and isinstance(value, str):
                problem = relative_problem(value, f"[{at}]")
                if problem:
                    problems.append(problem)
    elif isinstance(config, list):
        for i, value in enumerate(config):
            problems += deepspeed_path_problems(value, f"{where}.{i}")
    return problems
