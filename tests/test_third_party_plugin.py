"""The worked third-party plugin in docs/examples: installed, listed, used, switched off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "ngkit-eta-decay"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The example pip-installed into its own directory (the test venv stays untouched)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(EXAMPLE)],
        check=True,
    )
    return target


def ngkit(site: Path, *args: str, plugins: str | None) -> subprocess.CompletedProcess:
    # Not our own process group's variables (set by in-process runs of earlier tests): the child
    # must make its own group, not try to bind this process's port.
    skip = {"NGKIT_PLUGINS", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in skip}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    if plugins is not None:
        env["NGKIT_PLUGINS"] = plugins
    return subprocess.run(
        [sys.executable, "-m", "ngkit.cli.main", *args], env=env, capture_output=True, text=True, timeout=600
    )


def listed(site: Path, plugins: str | None) -> dict:
    proc = ngkit(site, "plugins", "--json", plugins=plugins)
    assert proc.returncode == 0, proc.stderr
    return {row["name"]: row for row in json.loads(proc.stdout)}


def test_installed_plugin_is_listed_with_its_package(site):
    rows = listed(site, plugins=None)
    row = rows["eta_decay"]
    assert row["package"] == "ngkit-eta-decay" and row["version"] == "0.1.0" and not row["builtin"]
    assert row["provides"] == {"step_size_policies": ["eta-decay"]}
    assert "conv_decoder" in rows  # built-ins still there


def test_ngkit_plugins_selects_it_or_keeps_it_out(site):
    assert "eta_decay" not in listed(site, plugins="")
    assert "eta_decay" in listed(site, plugins="eta_decay")


def test_it_runs_from_a_recipe_and_is_refused_when_switched_off(site, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        (ROOT / "recipes" / "quickstart.toml").read_text().replace(
            '[method.step_size]\nname = "kl"\nbound = 1.0', '[method.step_size]\nname = "eta-decay"\nstart = 50.0\nend = 5.0'
        )
    )
    small = ["--set", "run.steps=4", "--set", "run.eval_every=0", "--set", "eval.num_images=16",
             "--set", "model.encoder.depth=1", "--set", "data.batch_size=4", "--quiet"]
    proc = ngkit(site, "run", str(recipe), "--out", str(tmp_path / "run"), *small, plugins=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    etas = [r["eta"] for r in records if r.get("kind") == "train"]
    assert etas and all(5.0 <= e < 50.0 for e in etas)  # decayed from 50 towards 5
    off = ngkit(site, "run", str(recipe), "--out", str(tmp_path / "off"), *small, plugins="")
    assert off.returncode == 2
    assert 'unknown step-size policy name "eta-decay"' in off.stderr
