"""``ngkit export`` and ``ngkit.load``: the exported tokenizer is the trained model, bit for bit;
the export is deterministic, holds no training state, and loads without DeepSpeed or the dataset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ngkit
from child_processes import child_env, free_port
from ngkit.cli.main import main
from ngkit import data
from ngkit.engine.load import load_run
from ngkit.engine.train_loop import train
from ngkit.errors import NgkitError
from ngkit.export import CONFIG, WEIGHTS, export
from ngkit.recipe import parse_recipe
from ngkit_plugins.embedded_data import Digits
from tiny_recipe import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = {"run": {"steps": 4, "eval_every": 0, "checkpoint_every": 0}, "eval": {"metrics": ["mse"], "num_images": 16}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    train(parse_recipe(tiny(**SHORT), "tiny"), out, quiet=True)
    return out


@pytest.fixture(scope="module")
def exported(run_dir: Path) -> Path:
    export(run_dir, run_dir / "export")
    return run_dir / "export"


def trained_outputs(run_dir: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and reconstructions of the trained model, loaded by DeepSpeed as `ngkit eval` does."""
    method = load_run(run_dir).engine.module.eval()
    codes = method.encode(images)
    return codes, method.decode(codes).float().clamp(0, 1)


def test_export_load_equals_the_trained_model_bit_for_bit(run_dir, exported):
    images = next(data.test_batches(Digits(), 64, 0, 1, 64))
    want_codes, want_images = trained_outputs(run_dir, images)
    for source in (exported, run_dir, run_dir / "checkpoints" / "step-00000004"):
        tok = ngkit.load(source)
        codes = tok.encode(images)
        assert codes.dtype == torch.long and codes.shape == (64, 16)
        assert torch.equal(codes, want_codes), source
        assert torch.equal(tok.decode(codes), want_images), source


def test_export_holds_the_config_and_only_the_tokenizer_weights(run_dir, exported):
    config = json.loads((exported / CONFIG).read_text())
    assert config["format"] == "ngkit-tokenizer" and config["step"] == 4 and config["dtype"] == "float32"
    assert config["image"]["channels"] == 1 and config["image"]["height"] == config["image"]["width"] == 8
    assert config["image"]["mean"] == list(Digits().spec.mean) and config["image"]["std"] == list(Digits().spec.std)
    assert config["latent"] == {"grid": [4, 4], "codes": 16, "tokens": 16, "patch_size": 2}
    assert config["components"]["model.encoder"]["name"] == "transformer"
    assert config["sources"]["model.decoder"] == {
        "kind": "decoders", "name": "conv", "plugin": "conv_decoder", "package": "ngkit", "version": ngkit.__version__,
    }
    assert config["ngkit_version"] == ngkit.__version__ and config["sample"] is True
    weights = load_file(exported / WEIGHTS)
    assert {key.split(".")[0] for key in weights} == {"encoder", "decoder"}
    assert "step_size" in config["not_exported"]  # η and its optimiser state stay behind
    saved = torch.load(run_dir / "checkpoints" / "step-00000004" / "mp_rank_00_model_states.pt", weights_only=True)
    assert any(key.startswith("step_size.") for key in saved["module"])
    for key, value in weights.items():
        assert torch.equal(value, saved["module"][key]), key


def test_export_is_deterministic_across_processes(run_dir, exported, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ngkit.cli.main", "export", str(run_dir), "--out", str(tmp_path / "again")],
        env=child_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in (WEIGHTS, CONFIG):
        assert (tmp_path / "again" / name).read_bytes() == (exported / name).read_bytes(), name


def test_load_imports_neither_deepspeed_nor_the_dataset(run_dir, exported):
    code = (
        "import sys, torch, ngkit\n"
        f"for path in ({str(exported)!r}, {str(run_dir)!r}):\n"
        "    tok = ngkit.load(path)\n"
        "    tok.decode(tok.encode(torch.rand(2, 1, 8, 8)))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('deepspeed', 'sklearn')}),\n"
        "      torch.distributed.is_initialized())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[-2] == "[] False"


def test_bfloat16_export_on_request(run_dir, tmp_path):
    assert main(["export", str(run_dir), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    weights = load_file(tmp_path / "bf16" / WEIGHTS)
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.bfloat16}
    tok = ngkit.load(tmp_path / "bf16")
    assert tok.dtype == torch.bfloat16
    assert tok.decode(tok.encode(torch.rand(2, 1, 8, 8))).dtype == torch.float32


def test_export_of_a_missing_step_says_which_steps_exist(run_dir, tmp_path):
    assert main(["export", str(run_dir), "--step", "3", "--out", str(tmp_path / "x")]) == 2
    with pytest.raises(NgkitError, match="step-00000004"):
        ngkit.load(run_dir, step=3)


# ---- a two-rank ZeRO-3 run: its partitions consolidated into the same export

ZERO3_SCRIPT = """
import sys, torch, tomli_w
from pathlib import Path
from ngkit import data
from ngkit.engine.load import load_run
from ngkit.engine.train_loop import train
from ngkit.recipe import load_recipe
from ngkit_plugins.embedded_data import Digits

recipe_path, out = sys.argv[1], Path(sys.argv[2])
train(load_recipe(recipe_path), out, quiet=True)
method = load_run(out).engine.module.eval()  # every rank: ZeRO-3 gathers the weights per module
images = next(data.test_batches(Digits(), 64, 0, 1, 64))
codes = method.encode(images)
recon = method.decode(codes).float().clamp(0, 1)
if torch.distributed.get_rank() == 0:
    torch.save({"images": images, "codes": codes, "recon": recon}, out / "trained_outputs.pt")
"""


@pytest.mark.slow
def test_two_rank_zero3_run_exports_to_the_trained_model(tmp_path):
    import tomli_w

    raw = tiny(distributed={"zero_stage": 3}, optim={"clip": "norm"}, **SHORT)
    (tmp_path / "tiny.toml").write_text(tomli_w.dumps(raw))
    (tmp_path / "script.py").write_text(ZERO3_SCRIPT)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(tmp_path / "script.py"), str(tmp_path / "tiny.toml"), str(out)]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (out / "checkpoints" / "step-00000004" / "mp_rank_00_model_states.pt").exists()  # partitioned
    want = torch.load(out / "trained_outputs.pt")
    export(out, tmp_path / "export")
    tok = ngkit.load(tmp_path / "export")
    codes = tok.encode(want["images"])
    assert torch.equal(codes, want["codes"])
    assert torch.equal(tok.decode(codes), want["recon"])
