"""Process-group set-up: the same code runs as a plain process or under any launcher.

Rank, local rank and world size come from the launcher's environment:

- ``torchrun`` and the ``deepspeed`` launcher (single or multi-node): ``RANK``, ``LOCAL_RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``;
- SLURM (``srun``): ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``; the rendezvous host is
  the first node of ``SLURM_JOB_NODELIST`` unless ``MASTER_ADDR`` is set;
- Open MPI (``mpirun``): ``OMPI_COMM_WORLD_RANK``/``_LOCAL_RANK``/``_SIZE``; MPICH/Intel MPI:
  ``PMI_RANK``/``PMI_SIZE`` (with ``MPI_LOCALRANKID``). ``MASTER_ADDR`` must be exported.
- none of these: a plain ``ngkit run``, a one-process group of its own.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Any

import torch

from ngkit.errors import NgkitError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


# (launcher, rank variable, local-rank variable, world-size variable)
LAUNCHERS = [
    ("slurm", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("mpich", "PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE"),
]


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,9],cpu1`` -> ``gpu03``."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise NgkitError(f"cannot read SLURM_JOB_NODELIST {nodelist!r}; export MASTER_ADDR=<first node>")
    prefix, ranges = head.group(1), head.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def launcher_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The torch.distributed variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) this
    process should use, read from whichever launcher started it; empty for a plain process."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, deepspeed launcher, or set by hand
        out = {k: env[k] for k in ("RANK", "WORLD_SIZE")}
        out["LOCAL_RANK"] = env.get("LOCAL_RANK", "0")
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in env:
                raise NgkitError(f"RANK and WORLD_SIZE are set but {key} is not; export {key} for the rendezvous")
            out[key] = env[key]
        return out
    for name, rank_var, local_var, size_var in LAUNCHERS:
        if rank_var in env and size_var in env:
            out = {"RANK": env[rank_var], "WORLD_SIZE": env[size_var], "LOCAL_RANK": env.get(local_var, "0")}
            if "MASTER_ADDR" in env:
                out["MASTER_ADDR"] = env["MASTER_ADDR"]
            elif name == "slurm" and "SLURM_JOB_NODELIST" in env:
                out["MASTER_ADDR"] = first_slurm_host(env["SLURM_JOB_NODELIST"])
            elif int(env[size_var]) == 1:
                out["MASTER_ADDR"] = "127.0.0.1"
            else:
                raise NgkitError(
                    f"started by {name} ({rank_var}={env[rank_var]}, {size_var}={env[size_var]}) but "
                    f"MASTER_ADDR is not set; export MASTER_ADDR=<host of rank 0> (and MASTER_PORT)"
                )
            job = env.get("SLURM_JOB_ID", "0")
            out["MASTER_PORT"] = env.get("MASTER_PORT", str(20000 + int(job) % 20000 if job.isdigit() else 29500))
            return out
    return {}


def pick_device(requested: str) -> torch.device:
    local_rank = int(launcher_env().get("LOCAL_RANK", 0))
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def set_accelerator_env(device: torch.device) -> None:
    """DeepSpeed picks its accelerator at import time; it must agree with our device."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_cpu_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (``deepspeed_shm_comm``)
    when its process group starts: tens of seconds, a lock in the build cache that a killed start-up
    leaves behind, and only inference uses it. Training needs plain gloo collectives, so skip it."""
    import importlib

    # by name: ``import deepspeed.comm.torch as m`` would bind the attribute ``torch`` of
    # ``deepspeed.comm``, which is the torch package itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def init_distributed(device: torch.device, backend: str = "auto") -> DistInfo:
    """Join the launcher's process group, or make a one-process group when run plainly.

    The group lives as long as the process: DeepSpeed caches it, so a second run in the same
    process (tests, ``ngkit compare``) reuses it rather than making a new one."""
    found = launcher_env()
    if not found:  # plain `ngkit run`: a single-process group of our own
        found = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": os.environ.get("MASTER_PORT") or str(_free_port())}
    os.environ.update(found)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    import deepspeed

    if device.type == "cpu":
        _skip_cpu_shm_op()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False, auto_mpi_discovery=False)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistInfo(
        torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ["LOCAL_RANK"]), device
    )


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_ranks_agree(*flags: bool | torch.Tensor, device: torch.device | str = "cpu", group: Any = None) -> list[bool]:
    """For each flag (a bool, or a bool tensor on ``device`` that stays there until this one
    read), whether it is true on every rank: one all-reduce for all of them, and the same answers
    on every rank; with one rank, the flags themselves (no collective). Reading the answer waits
    for the device's queued work (a host sync)."""
    if not _several_ranks(group):
        return [bool(f) for f in flags]
    device = torch.device(device)
    if any(isinstance(f, torch.Tensor) for f in flags):
        # torch.full is a fill kernel: no host-to-device copy, which would wait for the queue
        values = torch.stack([f.to(device, torch.float32) if isinstance(f, torch.Tensor)
                              else torch.full((), float(f), device=device) for f in flags])
    else:
        values = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MIN, group=group)
    return [v > 0 for v in values.tolist()]


def _several_ranks(group: Any = None) -> bool:
    """Whether a process group of more than one rank is up (else a collective is the identity)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


_HOST_GROUP: list[Any] = []  # the gloo group of host_group(), made once per process


def host_group() -> Any:
    """A process group for agreeing on host values (a forward that raised, a stop signal) without
    touching the accelerator: the default group when it is gloo, else a gloo group made once.
    Every rank must call this at the same point the first time (it makes a group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_backend() == "gloo":
        return None
    if not _HOST_GROUP:
        _HOST_GROUP.append(torch.distributed.new_group(backend="gloo"))
    return _HOST_GROUP[0]


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` averaged over all ranks (a copy): what every rank uses for a shared statistic or
    state update, so that all ranks stay identical."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return sum_over_ranks(values) / world


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over all ranks (a copy; the local state is left as it is)."""
    if _several_ranks():
        values = values.clone()
        torch.distributed.all_reduce(values)
    return values
