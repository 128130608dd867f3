"""The worked third-party packages in docs/examples, pip-installed once for the module: listed,
selected by entry-point or package name, trained from recipes, switched off, and the command
one of them adds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ngkit import PLUGIN_API

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"
SHAPES_RECIPE = EXAMPLES / "ngkit-shapes" / "ngkit_shapes" / "shapes.toml"
SHAPES_PLUGINS = {"shapes_data", "shapes_decoder", "shapes_metric", "shapes_commands"}
SMALL = ["--set", "run.steps=4", "--set", "run.eval_every=0", "--set", "eval.num_images=16",
         "--set", "model.encoder.depth=1", "--set", "data.batch_size=4", "--quiet"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Both examples pip-installed into one directory (the test venv stays untouched)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
         str(EXAMPLES / "ngkit-eta-decay"), str(EXAMPLES / "ngkit-shapes")],
        check=True,
    )
    return target


def ngkit(site: Path, *args: str, plugins: str | None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # Not our own process group's variables (set by in-process runs of earlier tests): the child
    # must make its own group, not try to bind this process's port.
    skip = {"NGKIT_PLUGINS", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in skip}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    env["COLUMNS"] = "200"
    if plugins is not None:
        env["NGKIT_PLUGINS"] = plugins
    return subprocess.run(
        [sys.executable, "-m", "ngkit.cli.main", *args], env=env, capture_output=True, text=True, timeout=600, cwd=cwd
    )


def listed(site: Path, plugins: str | None, *extra: str) -> dict:
    proc = ngkit(site, "plugins", "--json", *extra, plugins=plugins)
    assert proc.returncode == 0, proc.stderr
    return {row["name"]: row for row in json.loads(proc.stdout)}


def test_installed_plugins_are_listed_with_package_and_module_class(site):
    rows = listed(site, plugins=None)
    row = rows["eta_decay"]
    assert row["package"] == "ngkit-eta-decay" and row["version"] == "0.1.0" and not row["builtin"]
    assert row["api"] == PLUGIN_API  # the NGKIT_PLUGIN_API its module declares
    assert row["components"] == {"step_size_policies": {"eta-decay": "ngkit_eta_decay:EtaDecay"}}
    assert rows["shapes_data"]["components"] == {"datasets": {"shapes": "ngkit_shapes.dataset:Shapes"}}
    assert rows["shapes_decoder"]["components"] == {"decoders": {"patch-bernoulli": "ngkit_shapes.decoder:PatchBernoulli"}}
    assert rows["shapes_metric"]["components"] == {"metrics": {"foreground-iou": "ngkit_shapes.metric:ForegroundIoU"}}
    assert rows["shapes_commands"]["hooks"] == ["register_commands"]
    assert "conv_decoder" in rows  # built-ins still there


def test_ngkit_plugins_selects_by_entry_point_or_package_and_all_shows_the_rest(site):
    assert "eta_decay" not in listed(site, plugins="")
    assert set(listed(site, plugins="ngkit-shapes")) & {"eta_decay", *SHAPES_PLUGINS} == SHAPES_PLUGINS
    rows = listed(site, "eta_decay", "--all")
    assert rows["eta_decay"]["status"] == "loaded"
    assert {rows[name]["status"] for name in SHAPES_PLUGINS} == {"excluded"}
    assert rows["shapes_data"]["reason"] == 'left out by NGKIT_PLUGINS="eta_decay"'


def test_eta_decay_runs_from_a_recipe_and_is_refused_when_switched_off(site, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        (ROOT / "recipes" / "quickstart.toml").read_text().replace(
            '[method.step_size]\nname = "kl"\nbound = 1.0', '[method.step_size]\nname = "eta-decay"\nstart = 50.0\nend = 5.0'
        )
    )
    proc = ngkit(site, "run", str(recipe), "--out", str(tmp_path / "run"), *SMALL, plugins=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    etas = [r["eta"] for r in records if r.get("kind") == "train"]
    assert etas and all(5.0 <= e < 50.0 for e in etas)  # decayed from 50 towards 5
    off = ngkit(site, "run", str(recipe), "--out", str(tmp_path / "off"), *SMALL, plugins="ngkit-shapes")
    assert off.returncode == 2
    assert 'unknown step-size policy name "eta-decay"' in off.stderr
    assert ('"eta-decay" is provided by plugin "eta_decay" (package ngkit-eta-decay 0.1.0), which is installed '
            'but left out by NGKIT_PLUGINS="ngkit-shapes": add eta_decay (or its package, ngkit-eta-decay) to NGKIT_PLUGINS') in " ".join(off.stderr.split())


def test_shapes_dataset_decoder_and_metric_train_from_the_shipped_recipe(site, tmp_path):
    proc = ngkit(site, "run", str(SHAPES_RECIPE), "--out", str(tmp_path / "run"), *SMALL, plugins="ngkit-shapes")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.0 <= summary["metrics"]["foreground_iou"] <= 1.0 and "psnr" in summary["metrics"]
    assert summary["protocol"]["foreground-iou"]["threshold"] == 0.25  # [eval.options] reached it
    assert summary["protocol"]["foreground-iou"]["images"] == 16


def test_plugin_command_is_added_and_listed(site, tmp_path):
    help_text = ngkit(site, "--help", plugins=None)
    assert help_text.returncode == 0 and "shapes-preview" in help_text.stdout
    proc = ngkit(site, "shapes-preview", str(tmp_path / "grid.png"), "--count", "4", plugins=None)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 4 shapes" in proc.stdout and (tmp_path / "grid.png").stat().st_size > 0
    off = ngkit(site, "shapes-preview", str(tmp_path / "x.png"), plugins="")
    assert off.returncode == 2 and "No such command" in off.stderr
