"""benchmarks/gpu_check.py: the one GPU command, run on tiny shapes on CPU (``--dry-run``), so that
it is known to work before a GPU is lent; its time boxes and its table of GPU peaks."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from child_processes import child_env

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "check.json"
    # without this process's launcher variables: a test before may have made a process group here
    env = child_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_dry_run_runs_every_section(tmp_path):
    report, printed = _run(tmp_path)
    sections = report["sections"]
    assert list(sections) == ["attention", "step", "sampling", "compile", "fid"]
    assert {name: part["status"] for name, part in sections.items()} == dict.fromkeys(sections, "ok"), sections
    attention = sections["attention"]["result"]
    assert attention["kernels"] == ["sdpa"] and "unavailable" in attention["xformers"]
    yardstick = attention["diff"]["sdpa bf16 vs sdpa fp32"]
    assert 0 < yardstick["max_abs"] and 0 < yardstick["max_rel"] < 0.5  # bf16 changes the numbers, a little
    step = sections["step"]["result"]
    assert step["flops_per_step"] > 0 and step["mfu"] is None  # no GPU peak for a CPU
    assert step["images_per_s"] == pytest.approx(step["batch"] / (step["step_ms"] / 1e3))
    assert {"sampling", "teacher-forced pass", "backward", "optimizer"} <= set(step["bench_phases_ms"])
    sampling = sections["sampling"]["result"]
    assert sampling["cached_equals_uncached_codes"]  # the KV cache changes the cost, not the codes
    assert sampling["ratio_kv_cache"] > 0 and sampling["tokens"] == 64
    assert set(sections["compile"]["result"]) == {"plain", "torch.compile", "channels_last"}
    assert all("step_ms" in v for v in sections["compile"]["result"].values())
    assert sections["fid"]["result"]["images_per_s fp32"] > 0
    assert "gpu_check on cpu" in printed and "MFU n/a" in printed


def test_a_section_past_its_budget_is_stopped_and_recorded(tmp_path):
    report, printed = _run(tmp_path, "--only", "fid", "--budget", "fid=1")  # importing torch takes longer
    part = report["sections"]["fid"]
    assert part["status"] == "timeout" and "1 s budget" in part["error"]
    assert "fid        timeout" in printed


def test_peak_table_tells_the_h100_variants_apart():
    check = _module()
    assert check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert check.peak_tflops("NVIDIA H100 NVL") == 835.0
    assert check.peak_tflops("NVIDIA H200") == 989.0
    assert check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert check.peak_tflops("NVIDIA L40S") == 362.0 and check.peak_tflops("NVIDIA L40") == 181.0
    assert check.peak_tflops("Tesla T4") is None
