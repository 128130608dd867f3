"""The loaded tokenizer: a round trip for every method plugin, its batch helpers, clear errors for
wrong inputs, and a third-party component that exports, loads, and is named when missing."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file

import ngkit
from ngkit import data, hookimpl
from ngkit.engine.load import load_run
from ngkit.engine.train_loop import train
from ngkit.errors import DataError, NgkitError, PluginError
from ngkit.export import CONFIG, WEIGHTS, export
from ngkit.plugins import PluginInfo, get_plugin_manager
from ngkit.recipe import parse_recipe
from ngkit_plugins.conv_decoder import ConvDecoder
from ngkit_plugins.embedded_data import Digits
from tiny_recipe import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = {"run": {"steps": 2, "eval_every": 0, "checkpoint_every": 0, "log_every": 1},
         "eval": {"metrics": ["mse"], "num_images": 16}}
AUTOREGRESSIVE = {"name": "transformer", "width": 32, "depth": 1, "heads": 2, "latent_depth": 1, "factorised": False}
# method -> recipe sections that differ from the tiny recipe (codes = 16 throughout)
METHODS: dict[str, dict[str, Any]] = {
    "daps": {"method": {"name": "daps", "samples": 4}, "model": {"encoder": AUTOREGRESSIVE}},
    "daps-na": {},
    "vqvae": {"method": {"name": "vqvae", "quantizer": {"name": "vq", "dim": 8}}},
    "fsq": {"method": {"name": "fsq", "quantizer": {"name": "fsq", "levels": [4, 4]}}},
    "gumbel": {"method": {"name": "gumbel"}},
    "gr-mck": {"method": {"name": "gr-mck", "rao_samples": 2}},
    "reinforce": {"method": {"name": "reinforce", "samples": 4}},
    "ppo": {"method": {"name": "ppo", "samples": 4, "epochs": 1}},
}
DETERMINISTIC = {"vqvae", "fsq"}  # no q(z|x) to sample from
# the parts of each method in the weights file (default: encoder and decoder) and those left out
EXPORTED = {"vqvae": {"encoder", "decoder", "quantizer", "to_code", "from_code"},
            "fsq": {"encoder", "decoder", "to_code", "from_code"}}  # FSQ's levels are rebuilt from options
NOT_EXPORTED = {"daps": {"step_size"}, "daps-na": {"step_size"}, "ppo": {"value", "kl_coef"}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Callable[[str], Path]:
    """The export of a tiny run of each method, trained on first use (one training per method)."""
    root = tmp_path_factory.mktemp("methods")
    runs: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in runs:
            sections = {**SHORT, **METHODS[method]}
            train(parse_recipe(tiny(**sections), method), root / method, quiet=True)
            export(root / method, root / method / "export")
            runs[method] = root / method
        return runs[method]

    return get


def images(n: int = 32) -> torch.Tensor:
    return next(data.test_batches(Digits(), n, 0, 1, n))


@pytest.mark.parametrize("method", list(METHODS))
def test_round_trip_for_every_method(trained, method):
    run_dir = trained(method)
    x = images()
    reference = load_run(run_dir).engine.module.eval()  # the trained model, as DeepSpeed restores it
    tok = ngkit.load(run_dir / "export")
    config = json.loads((run_dir / "export" / CONFIG).read_text())
    assert config["method"] == method
    parts = {key.split(".")[0] for key in load_file(run_dir / "export" / WEIGHTS)}
    assert parts == EXPORTED.get(method, {"encoder", "decoder"})
    assert set(config["not_exported"]) == NOT_EXPORTED.get(method, set())
    codes = tok.encode(x)
    assert codes.shape == (32, 16) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 16
    assert torch.equal(codes, reference.encode(x))
    recon = tok.decode(codes)
    assert recon.shape == x.shape and recon.dtype == torch.float32 and 0 <= recon.min() and recon.max() <= 1
    assert torch.equal(recon, reference.decode(codes).float().clamp(0, 1))
    if method in DETERMINISTIC:
        with pytest.raises(NgkitError, match="deterministic encoder"):
            tok.encode(x, sample=True)
    else:
        torch.manual_seed(1)
        sampled = tok.encode(x, sample=True)
        torch.manual_seed(1)
        assert torch.equal(sampled, tok.encode(x, sample=True)) and sampled.shape == codes.shape
        assert 0 <= sampled.min() and sampled.max() < 16


def test_batch_helpers_and_to(trained):
    tok = ngkit.load(trained("daps-na") / "export").to("cpu")
    x = images(10)
    whole = tok.encode(x)
    per_image = list(tok.encode_batch(iter(x), batch_size=4))
    assert [len(c) for c in per_image] == [4, 4, 2] and torch.equal(torch.cat(per_image), whole)
    per_batch = list(tok.encode_batch([x[:3], x[3:]]))
    assert [len(c) for c in per_batch] == [3, 7] and torch.equal(torch.cat(per_batch), whole)
    decoded = list(tok.decode_batch(iter(whole), batch_size=3))
    assert [len(r) for r in decoded] == [3, 3, 3, 1]
    # other batch sizes take other convolution kernels: equal up to rounding, not bit for bit
    torch.testing.assert_close(torch.cat(decoded), tok.decode(whole), rtol=0, atol=1e-6)
    assert torch.equal(torch.cat(list(tok.decode_batch([whole]))), tok.decode(whole))
    assert tok.latent.tokens == 16 and tok.latent.codes == 16 and tok.image.shape == (1, 8, 8)
    assert "daps-na" in repr(tok)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.rand(2, 3, 8, 8), r"shape \[2, 3, 8, 8\] .* takes \[B, 1, 8, 8\]"),
        (torch.rand(2, 1, 16, 16), r"resize or crop"),
        (torch.rand(1, 8, 8), r"unsqueeze\(0\)"),
        ((torch.rand(2, 1, 8, 8) * 255).to(torch.uint8), r"torch.uint8.*/ 255"),
        (torch.rand(2, 1, 8, 8) * 255, r"\[0, 1\], found .*divide"),
        (torch.rand(2, 1, 8, 8) - 0.5, r"\[0, 1\], found -"),
        (torch.full((2, 1, 8, 8), float("nan")), r"non-finite"),
        ([[0.5]], r"torch.Tensor"),
    ],
    ids=["channels", "size", "no-batch", "uint8", "0-255", "normalised", "nan", "list"],
)
def test_wrong_images_get_a_clear_error(trained, bad, message):
    tok = ngkit.load(trained("daps-na") / "export")
    with pytest.raises(DataError, match=message):
        tok.encode(bad)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.zeros(2, 4, 4, dtype=torch.long), r"shape \[2, 4, 4\] .* takes \[B, 16\].*reshape"),
        (torch.zeros(2, 15, dtype=torch.long), r"takes \[B, 16\]"),
        (torch.zeros(2, 16), r"integers"),
        (torch.full((2, 16), 16), r"0\.\.15, found 16\.\.16"),
        (torch.full((2, 16), -1), r"found -1"),
    ],
    ids=["grid", "length", "float", "too-big", "negative"],
)
def test_wrong_codes_get_a_clear_error(trained, bad, message):
    tok = ngkit.load(trained("daps-na") / "export")
    with pytest.raises(DataError, match=message):
        tok.decode(bad)


def test_a_path_that_is_no_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(NgkitError, match="does not exist"):
        ngkit.load(tmp_path / "missing")
    with pytest.raises(NgkitError, match="neither an ngkit run directory"):
        ngkit.load(tmp_path)


class MyDecoder(ConvDecoder):
    """A third party's decoder (the conv decoder under another name)."""


my_decoders = types.SimpleNamespace(register_decoders=hookimpl(lambda register: register("my-conv", MyDecoder)))


def test_third_party_component_exports_loads_and_is_named_when_missing(tmp_path):
    pm = get_plugin_manager()
    pm.add_plugin(my_decoders, PluginInfo("my_decoders", "ngkit-my-decoders", "1.2.0", False))
    try:
        sections = {**SHORT, "model": {"decoder": {"name": "my-conv", "width": 16, "embed_dim": 16}}}
        train(parse_recipe(tiny(**sections), "third-party"), tmp_path / "run", quiet=True)
        export(tmp_path / "run", tmp_path / "export")
        config = json.loads((tmp_path / "export" / CONFIG).read_text())
        assert config["sources"]["model.decoder"] == {
            "kind": "decoders", "name": "my-conv", "plugin": "my_decoders", "package": "ngkit-my-decoders",
            "version": "1.2.0",
        }
        tok = ngkit.load(tmp_path / "export")
        assert isinstance(tok.method.decoder, MyDecoder)
        codes = tok.encode(images(4))
    finally:
        pm.remove_plugin("my_decoders")
    named = r'"my-conv" is provided by plugin "my_decoders" of package ngkit-my-decoders 1\.2\.0.*pip install ngkit-my-decoders'
    with pytest.raises(PluginError, match=named):
        ngkit.load(tmp_path / "export")
    assert codes.shape == (4, 16)
