"""Launchers: two torchrun "nodes" rendezvousing on 127.0.0.1, SLURM-style processes with no RANK,
and the environment mapping of every launcher ngkit knows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from child_processes import child_env as clean_env
from child_processes import free_port
from image_sets import write_parquet
from ngkit.engine.artifacts import read_jsonl
from ngkit.engine.distributed import first_slurm_host, launcher_env
from ngkit.errors import NgkitError
from tiny_recipe import tiny


def ngkit_run(recipe: Path, out: Path) -> list[str]:
    return ["-m", "ngkit.cli.main", "run", str(recipe), "--out", str(out), "--quiet"]


def wait_all(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str]]:
    results = []
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        results.append((proc.returncode, err))
    return results


def test_two_torchrun_nodes_train_from_parquet_shards_with_workers(tmp_path):
    """torchrun --nnodes 2 --node_rank {0,1} on 127.0.0.1: 3 parquet shards, 2 workers per rank."""
    data = write_parquet(tmp_path / "pq", train=30, shards=3)
    raw = tiny(data={"name": "hf", "path": "parquet", "data_dir": str(data), "image_size": 8, "workers": 2,
                     "batch_size": 4},
               run={"steps": 4, "eval_every": 0, "checkpoint_every": 2, "checkpoint_minutes": 0},
               eval={"metrics": ["mse", "usage"], "num_images": 8, "batch_size": 4})
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tomli_w.dumps(raw))
    port, out = free_port(), tmp_path / "run"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
             "--master_addr=127.0.0.1", f"--master_port={port}", *ngkit_run(recipe, out)],
            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for node in (0, 1)
    ]
    for code, err in wait_all(procs):
        assert code == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 8 and summary["step"] == 4
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"] == [2, 4]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]


def test_slurm_style_processes_find_their_ranks(tmp_path):
    """Two processes started as srun starts them: SLURM_PROCID/SLURM_NTASKS, no RANK."""
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tomli_w.dumps(tiny(run={"steps": 2, "eval_every": 0, "checkpoint_minutes": 0},
                                         eval={"metrics": ["mse"], "num_images": 8})))
    port, out, builds = str(free_port()), tmp_path / "run", tmp_path / "torch-extensions"
    procs = [
        subprocess.Popen(
            [sys.executable, *ngkit_run(recipe, out)],
            env=clean_env(SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NTASKS="2", SLURM_JOB_ID="77",
                          SLURM_JOB_NODELIST="localhost", MASTER_PORT=port, TORCH_EXTENSIONS_DIR=str(builds)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in (0, 1)
    ]
    for code, err in wait_all(procs):
        assert code == 0, err[-3000:]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_node_local_run_directories_are_refused(tmp_path):
    """Two "nodes" whose --out has the same name on different disks (each its own working
    directory): checkpoints renamed by rank 0 would be invisible to rank 1, so both refuse."""
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tomli_w.dumps(tiny(run={"steps": 2, "checkpoint_minutes": 0})))
    port = str(free_port())
    procs = []
    for r in (0, 1):
        node_disk = tmp_path / f"node{r}"
        node_disk.mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "ngkit.cli.main", "run", str(recipe), "--out", "run", "--quiet"], cwd=node_disk,
            env=clean_env(SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NTASKS="2", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=port, PYTHONPATH=os.pathsep.join(sys.path)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for code, err in wait_all(procs):
        assert code == 2 and "not shared by all ranks" in err, err[-2000:]
    assert not (tmp_path / "node0" / "run" / "checkpoints").exists()


def test_deepspeed_launcher(tmp_path):
    """``deepspeed --num_gpus 2 --module ngkit.cli.main run ...``: the launcher each node of a
    hostfile run starts (it also passes --local_rank=N, which ngkit accepts)."""
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tomli_w.dumps(tiny(run={"steps": 2, "eval_every": 0, "checkpoint_minutes": 0},
                                         eval={"metrics": ["mse"], "num_images": 8})))
    out = tmp_path / "run"
    launcher = Path(sys.executable).with_name("deepspeed")
    proc = subprocess.run(
        [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "ngkit.cli.main", "run", str(recipe), "--out", str(out), "--quiet"],
        env={**clean_env(), "PATH": f"{launcher.parent}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, {}),
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "29500"},
         {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "29500"}),
        ({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1234",
          "SLURM_JOB_NODELIST": "gpu[03-06]"},
         {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu03", "MASTER_PORT": "21234"}),
        ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4",
          "MASTER_ADDR": "head", "MASTER_PORT": "6000"},
         {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "head", "MASTER_PORT": "6000"}),
        ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MASTER_ADDR": "h", "MASTER_PORT": "7"},
         {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "7"}),
    ],
    ids=["plain", "torchrun", "slurm", "openmpi", "mpich"],
)
def test_launcher_environment_mapping(env, expected):
    assert launcher_env(env) == expected


def test_launcher_without_a_rendezvous_host_is_a_clear_error():
    with pytest.raises(NgkitError, match="MASTER_ADDR"):
        launcher_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    with pytest.raises(NgkitError, match="MASTER_PORT"):
        launcher_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x"})


@pytest.mark.parametrize("nodelist, host", [("node7", "node7"), ("gpu[03-05,9]", "gpu03"), ("a[1,4],b2", "a1"), ("c-[10-12]", "c-10")])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host
