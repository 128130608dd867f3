"""Process-group set-up: the same code runs as a plain process or under torchrun/deepspeed."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def set_accelerator_env(device: torch.device) -> None:
    """DeepSpeed picks its accelerator at import time; it must agree with our device."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device, backend: str = "auto") -> DistInfo:
    """Join the launcher's process group, or make a one-process group when run plainly.

    The group lives as long as the process: DeepSpeed caches it, so a second run in the same
    process (tests, ``ngkit compare``) reuses it rather than making a new one."""
    if "RANK" not in os.environ:  # plain `ngkit run`: a single-process group of our own
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistInfo(
        torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ["LOCAL_RANK"]), device
    )


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()



def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over all ranks (a copy; the local state is left as it is)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        values = values.clone()
        torch.distributed.all_reduce(values)
    return values
