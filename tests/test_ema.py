"""``[run] ema``: the weight average against its closed form, moved only by applied steps,
checkpointed and resumed bit for bit, evaluated in training and picked by ``ngkit export``."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import ngkit
from ngkit import data, hookimpl
from ngkit.cli.main import main
from ngkit.components import StepOutput
from ngkit.engine.ema import Ema, make_ema, warmed_decay
from ngkit.engine.train_loop import train
from ngkit.errors import NgkitError, RecipeError
from ngkit.export import WEIGHTS, export
from ngkit.plugins import temporary_plugin
from ngkit.recipe import parse_recipe
from ngkit_plugins.embedded_data import Digits
from tiny_recipe import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = {"steps": 8, "eval_every": 0, "checkpoint_every": 4, "log_every": 2, "ema": 0.9}
EVAL = {"metrics": ["mse"], "num_images": 16}


class Parts(nn.Module):
    """A method-shaped module: an encoder and a decoder with parameters, and something else."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 2)
        self.decoder = nn.Linear(2, 3, bias=False)
        self.other = nn.Parameter(torch.zeros(4))  # not part of the average


def checkpoint_state(run_dir: Path, step: int) -> dict:
    path = run_dir / "checkpoints" / f"step-{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=True)


def test_the_average_equals_its_closed_form_on_a_toy_sequence():
    torch.manual_seed(0)
    model, decay = Parts(), 0.95
    names = ["encoder.weight", "encoder.bias", "decoder.weight"]
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    ema = Ema(model, decay)
    assert set(ema.shadow) == set(names)
    values = []
    for _ in range(200):  # parameters take arbitrary values, as an optimiser would give them
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        values.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
        ema.update(model)
    # e_n = prod_k d_k p_0 + sum_k (1 - d_k) prod_{j > k} d_j p_k, d_k = min(decay, (1+k)/(10+k))
    d = [warmed_decay(decay, k) for k in range(1, 201)]
    assert d[0] == pytest.approx(2 / 11) and d[-1] == decay  # the warm-up, then the recipe's decay
    for name in names:
        want = start[name] * torch.tensor(d, dtype=torch.float64).prod()
        for k, value in enumerate(values):
            want = want + (1 - d[k]) * torch.tensor(d[k + 1:], dtype=torch.float64).prod() * value[name]
        torch.testing.assert_close(ema.shadow[name].double(), want, rtol=1e-5, atol=1e-6)


def test_swapped_evaluates_the_average_and_restores_the_weights_exactly():
    model = Parts()
    ema = Ema(model, 0.9)
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    for s in ema.shadow.values():
        s.add_(1.0)
    with ema.swapped(model):
        assert torch.equal(model.encoder.weight, raw["encoder.weight"] + 1)
        assert torch.equal(model.other, raw["other"])
    for n, p in model.named_parameters():
        assert torch.equal(p, raw[n])


def test_zero_3_and_a_method_without_parts_are_refused():
    with pytest.raises(RecipeError, match="ZeRO stage 3"):
        make_ema(Parts(), 0.999, zero_stage=3)
    with pytest.raises(RecipeError, match="no trainable encoder or decoder"):
        make_ema(nn.Linear(2, 2), 0.999, zero_stage=0)
    assert make_ema(Parts(), 0.0, zero_stage=3) is None


class NaNParts(Parts):
    """Trains encoder and decoder towards zero; the loss is NaN at steps [3, 6)."""

    def __init__(self, *, latent) -> None:
        super().__init__()
        self.latent = latent

    def forward(self, x, step):
        loss = self.encoder.weight.square().sum() + self.decoder.weight.square().sum() + 0 * x.mean()
        if 3 <= step < 6:
            loss = loss * float("nan")
        return StepOutput(loss, {"loss": float(loss.detach())})

    def after_step(self, step):
        return {}

    def encode(self, x):
        return torch.zeros(x.shape[0], self.latent.tokens, dtype=torch.long)

    def decode(self, z):
        return torch.zeros(z.shape[0], 1, 8, 8)


nan_plugin = types.SimpleNamespace(register_methods=hookimpl(lambda register: register("nan-parts", NaNParts)))


def test_skipped_steps_do_not_move_the_average(tmp_path):
    with temporary_plugin(nan_plugin, "nan_plugin"):
        result = train(parse_recipe(tiny(method={"name": "nan-parts"}, run=QUICK, eval=EVAL), "t"),
                       tmp_path / "run", quiet=True)
    assert result.summary["skipped_steps"] == 3
    assert checkpoint_state(tmp_path / "run", 8)["ema"]["updates"] == 5
    assert checkpoint_state(tmp_path / "run", 4)["ema"]["updates"] == 2  # steps 1 and 2; 3 and 4 were skipped


def test_resume_gives_the_same_average_bit_for_bit(tmp_path):
    constant = {"beta": {"name": "constant", "value": 0.1}}  # the 4-step run's schedule is the 8-step one's
    straight = train(parse_recipe(tiny(run=QUICK, eval=EVAL, schedule=constant), "t"), tmp_path / "straight", quiet=True)
    half = tiny(run={**QUICK, "steps": 4}, eval=EVAL, schedule=constant)
    train(parse_recipe(half, "t"), tmp_path / "resumed", quiet=True)
    resumed = train(parse_recipe(tiny(run=QUICK, eval=EVAL, schedule=constant), "t"), tmp_path / "resumed",
                    resume=True, quiet=True)
    full, again = checkpoint_state(tmp_path / "straight", 8), checkpoint_state(tmp_path / "resumed", 8)
    for name in full["module"]:  # the run itself resumes exactly, so its average can
        assert torch.equal(full["module"][name], again["module"][name]), name
    a, b = full["ema"], again["ema"]
    assert a["updates"] == b["updates"] == 8
    assert a["shadow"].keys() == b["shadow"].keys()
    for name in a["shadow"]:
        assert torch.equal(a["shadow"][name], b["shadow"][name]), name
    assert straight.summary["metrics"] == resumed.summary["metrics"]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ema") / "run"
    train(parse_recipe(tiny(run=QUICK, eval=EVAL), "t"), out, quiet=True)
    return out


def test_export_writes_the_average_by_default_and_raw_on_request(ema_run, tmp_path):
    saved = checkpoint_state(ema_run, 8)
    shadow, module = saved["ema"]["shadow"], saved["module"]
    assert main(["export", str(ema_run), "--out", str(tmp_path / "ema")]) == 0
    assert main(["export", str(ema_run), "--out", str(tmp_path / "raw"), "--weights", "raw"]) == 0
    ema_w, raw_w = load_file(tmp_path / "ema" / WEIGHTS), load_file(tmp_path / "raw" / WEIGHTS)
    averaged = [k for k in ema_w if k in shadow]
    assert averaged and all(k.split(".")[0] in ("encoder", "decoder") for k in averaged)
    for key in ema_w:
        assert torch.equal(ema_w[key], shadow[key] if key in shadow else module[key]), key
        assert torch.equal(raw_w[key], module[key]), key
    assert any(not torch.equal(ema_w[k], raw_w[k]) for k in averaged)
    assert ngkit.load(tmp_path / "ema").config["weights"] == "ema"


def test_training_evaluates_the_average(ema_run):
    """The final test/mse of the run is the EMA export's, not the raw weights'."""
    import json

    summary = json.loads((ema_run / "summary.json").read_text())
    images = torch.cat(list(data.test_batches(Digits(), 16, 0, 1, 16)))

    def mse(weights: str) -> float:
        snap_dir = ema_run / f"export-{weights}"
        export(ema_run, snap_dir, weights=weights)
        tok = ngkit.load(snap_dir)
        return float((tok.decode(tok.encode(images)) - images).square().mean())

    assert summary["metrics"]["mse"] == pytest.approx(mse("ema"), rel=1e-5)
    assert summary["metrics"]["mse"] != pytest.approx(mse("raw"), rel=1e-5)


def test_export_of_a_run_without_an_average_refuses_ema(tmp_path):
    out = tmp_path / "run"
    train(parse_recipe(tiny(run={**QUICK, "ema": 0.0}, eval=EVAL), "t"), out, quiet=True)
    with pytest.raises(NgkitError, match="holds no weight average"):
        export(out, tmp_path / "x", weights="ema")
    assert export(out, tmp_path / "y").config["weights"] == "raw"


def test_ngkit_eval_scores_the_average_as_training_did(ema_run):
    from ngkit.cli.eval_cmd import eval_run

    summary = json.loads((ema_run / "summary.json").read_text())
    args = dict(num_images=16, data=None, split="test", reference_stats=None, inception_weights=None,
                batch_size=16)
    ema = eval_run(ema_run, ["mse"], **args)
    raw = eval_run(ema_run, ["mse"], **args, weights="raw")
    assert ema["weights"] == "ema" and raw["weights"] == "raw"
    assert ema["values"]["mse"] == pytest.approx(summary["metrics"]["mse"], rel=1e-6)
    assert raw["values"]["mse"] != pytest.approx(ema["values"]["mse"], rel=1e-6)
