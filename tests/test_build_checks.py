"""Bad input ends in one clear message: `recipes validate` builds what `run` builds, components'
shapes are checked with a dummy batch, exceptions in plugin code name the plugin, its package
and the recipe key, and unknown options are usage errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import torch

import broken_plugins
from child_processes import free_port
from ngkit.cli.main import main, plugin_error
from ngkit.plugins import temporary_plugin
from tiny_recipe import tiny

TESTS = Path(__file__).resolve().parent
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")
PLUGIN = "plugin transformer_encoder (ngkit 0.1.0)"


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(tomli_w.dumps(tiny(run={"steps": 2, "eval_every": 0, "checkpoint_every": 0})))
    return path


def validate(capsys: pytest.CaptureFixture, recipe: Path, *sets: str) -> tuple[int, str]:
    code = main(["recipes", "validate", str(recipe), *[a for s in sets for a in ("--set", s)]])
    return code, capsys.readouterr().err


# (label, --set values, fragments of the message); each made `ngkit run` crash with a traceback
REFUSED = [
    ("encoder width 0", ["model.encoder.width=0"], ['[model.encoder] encoder "transformer"', PLUGIN, "width must be at least 1"]),
    ("encoder depth 0", ["model.encoder.depth=0"], ["[model.encoder]", PLUGIN, "depth must be at least 1, got 0"]),
    ("encoder heads 0", ["model.encoder.heads=0"], ["[model.encoder]", PLUGIN, "heads must be at least 1, got 0"]),
    ("res_blocks -1", ["model.decoder.res_blocks=-1"],
     ['[model.decoder] decoder "conv" (plugin conv_decoder (ngkit 0.1.0))', "res_blocks must be at least 0, got -1"]),
    ("head_init_scale inf", ["model.encoder.head_init_scale=inf"], ["[model.encoder]", "head_init_scale", "got inf"]),
    ("one sample", ["method.samples=1"],
     ['[method] method "daps-na" (plugin daps_method (ngkit 0.1.0))', "samples (K) must be >= 2"]),
    ("daps-na, autoregressive encoder", ["model.encoder.factorised=false"],
     ["[method]", "needs a factorised (non-autoregressive) encoder"]),
    ("fsq levels against codes", ['method={name="fsq", quantizer={name="fsq", levels=[4, 5]}}'],
     ['[method.quantizer] quantizer "fsq" (plugin vq_lib', "give 20 codes per level but 16 are needed"]),
]
CPU_ONLY = [
    ("fp16 on CPU", ['distributed.precision="fp16"', 'run.device="cpu"'],
     ['[distributed.precision] "fp16" needs a CUDA GPU (device = "cpu")', 'use "bf16" or "fp32"']),
    ("cuda without a GPU", ['run.device="cuda"'], ['[run.device] "cuda", but torch sees no CUDA GPU']),
]
CASES = [pytest.param(*c, id=c[0]) for c in REFUSED] + [pytest.param(*c, id=c[0], marks=NO_GPU) for c in CPU_ONLY]


@pytest.mark.parametrize("label, sets, fragments", CASES)
def test_validate_refuses_what_run_cannot_build(capsys, recipe, label, sets, fragments):
    code, err = validate(capsys, recipe, *sets)
    assert code == 2, err
    assert "invalid:" in err and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in:\n{err}"


def test_validate_reports_every_component_problem_at_once(capsys, recipe):
    code, err = validate(capsys, recipe, "model.encoder.width=0", "model.decoder.res_blocks=-1", "schedule.beta.start=-1")
    assert code == 2
    assert "3 problems" in err and "[model.encoder]" in err and "[model.decoder]" in err and "[schedule.beta]" in err


def test_validate_builds_nothing_it_does_not_need(capsys, recipe):
    """The models are built on the meta device: a model of 6 x 10^8 parameters (2.4 GB of float32,
    seconds to initialise for real) validates at once. (10^13 parameters is now refused by the
    memory estimate: tests/test_security.py.)"""
    code, err = validate(capsys, recipe, "model.encoder.width=1024", "model.encoder.depth=48")
    assert code == 0, err


@pytest.mark.parametrize(
    "sets, fragment",
    [(["model.encoder.head_init_scale=inf"], "[model.encoder]"), (['run.device="cuda"'], "[run.device]")],
    ids=["constructor", "device"],
)
def test_run_gives_the_same_message_and_writes_nothing(capsys, recipe, tmp_path, sets, fragment):
    if "cuda" in sets[0] and torch.cuda.is_available():
        pytest.skip("checks a machine without a CUDA GPU")
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and fragment in err and "Traceback" not in err
    assert not out.exists()


def test_decoder_output_shape_is_checked_at_build(capsys, recipe, tmp_path):
    with temporary_plugin(broken_plugins, "broken_plugins"):
        code, err = validate(capsys, recipe, 'model.decoder.name="flat-decoder"')
        assert code == 2
        assert '[model.decoder] decoder "flat-decoder" (plugin broken_plugins ((in-process) -))' in err
        assert "mean(forward(h)) has shape [2, 1, 1, 1], expected [2, 1, 8, 8]" in err
        out = tmp_path / "run"
        assert main(["run", str(recipe), "--out", str(out), "--quiet", "--set", 'model.decoder.name="flat-decoder"']) == 2
    assert "expected [2, 1, 8, 8]" in capsys.readouterr().err
    assert not (out / "summary.json").exists()


def test_encoder_logits_shape_is_checked_at_build(capsys, recipe):
    with temporary_plugin(broken_plugins, "broken_plugins"):
        code, err = validate(capsys, recipe, 'model.encoder.name="short-logits-encoder"')
    assert code == 2
    assert '[model.encoder] encoder "short-logits-encoder"' in err
    assert "log_prob(x, z).logits has shape [2, 16, 15], expected [2, 16, 16]" in err


def test_a_plugin_that_cannot_build_on_meta_is_judged_on_the_cpu(capsys, recipe):
    with temporary_plugin(broken_plugins, "broken_plugins"):
        code, err = validate(capsys, recipe, 'model.decoder={name="value-reading-decoder"}')
        assert code == 0, err
        code, err = validate(capsys, recipe, 'model.decoder={name="value-reading-decoder", width=0}')
    assert code == 2 and "width must be at least 1" in err


def test_exception_in_plugin_forward_names_plugin_package_and_key(capsys, recipe, tmp_path):
    with temporary_plugin(broken_plugins, "broken_plugins"):
        args = ["run", str(recipe), "--out", str(tmp_path / "run"), "--quiet", "--set", 'model.decoder.name="exploding-decoder"']
        assert main(args) == 2
        err = capsys.readouterr().err
        assert 'in plugin broken_plugins ((in-process) -) at [model.decoder] (decoder "exploding-decoder")' in err
        assert "RuntimeError: decoder exploded" in err and "broken_plugins.py" in err
        assert "for the traceback: ngkit --debug run" in err and "Traceback" not in err
        args[3] = str(tmp_path / "run-debug")
        assert main(["--debug", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: decoder exploded" in err


def test_an_exception_in_ngkit_itself_is_not_blamed_on_a_plugin():
    try:
        {}["missing"]
    except KeyError as exc:
        assert plugin_error(exc, "run") is None


@pytest.mark.parametrize("argv", [["run", "--bogus"], ["--bogus"], ["recipes", "validate", "--nope", "x.toml"]])
def test_unknown_option_is_a_short_usage_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "No such option" in err and "Traceback" not in err and len(err.splitlines()) <= 5


def test_plugin_error_under_torchrun_names_the_plugin_and_fails(tmp_path):
    """Each rank runs main(); a plugin that raises in forward stops both with that message."""
    site = tmp_path / "site"
    dist_info = site / "ngkit_broken-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: ngkit-broken\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[ngkit]\nbroken_plugins = broken_plugins\n")
    raw = tiny(run={"steps": 2, "eval_every": 0, "checkpoint_every": 0})
    raw["model"]["decoder"]["name"] = "exploding-decoder"
    recipe = tmp_path / "r.toml"
    recipe.write_text(tomli_w.dumps(raw))
    skip = {"NGKIT_PLUGINS", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in skip}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(TESTS)]), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "ngkit.cli.main", "run", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert proc.stderr.count("in plugin broken_plugins (ngkit-broken 0.1) at [model.decoder]") == 2, proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr  # the ranks' own exit code, in torchrun's report
