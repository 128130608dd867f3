"""What the tests need to start ngkit in other processes: a free port and a clean environment."""

from __future__ import annotations

import os
import socket

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """This environment without this process's launcher variables (a child makes its own process
    group), on the CPU accelerator with one thread and the built-in plugins; ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "NGKIT_PLUGINS": "", **extra}
