"""Run several trainings in one multi-rank process group (launched by the tests under torchrun).

    torchrun --nproc_per_node 2 tests/rank_worker.py jobs.json

``jobs.json`` is a list of ``{"out": DIR, "recipe": {...}, "resume": bool}`` (trained with
``ngkit.engine.train_loop.train``) or ``{"argv": [...]}`` (run through the ``ngkit`` CLI). Each job's
outcome (``ok`` or the error) is written to ``DIR/../<name>.rank<R>.json`` by every rank.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from fault_plugins import fault_plugin

from ngkit.cli.main import main as cli_main
from ngkit.engine.train_loop import train
from ngkit.plugins import temporary_plugin
from ngkit.recipe import parse_recipe


def run_job(job: dict) -> dict:
    if "argv" in job:
        code = cli_main(job["argv"])
        if code:
            raise SystemExit(f"ngkit {' '.join(job['argv'][:2])} exited with {code}")
        return {}
    recipe = parse_recipe(job["recipe"], job["out"])
    result = train(recipe, Path(job["out"]), resume=job.get("resume", False), quiet=True)
    return {"skipped_steps": result.summary["skipped_steps"], "step": result.summary["step"]}


def main(path: str) -> None:
    import torch.distributed as dist

    jobs = json.loads(Path(path).read_text())
    with temporary_plugin(fault_plugin, "fault_plugins"):
        for job in jobs:
            status = Path(job["status"])
            try:
                outcome = {"ok": True, **run_job(job)}
            except BaseException as exc:  # recorded for the test, then the next job
                outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
            rank = dist.get_rank() if dist.is_initialized() else 0
            status.with_name(f"{status.name}.rank{rank}.json").write_text(json.dumps(outcome))
            if not outcome["ok"]:
                break


if __name__ == "__main__":
    main(sys.argv[1])
