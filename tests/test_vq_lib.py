"""The vector-quantize-pytorch quantizers (plugins/vq_lib.py): each trains, exports, loads and
encodes like a built-in; combined residual codes invert exactly; defaults are the library's;
bad options and a missing extra give errors that name the quantizer, the key and the fix."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch

import ngkit
from ngkit import data
from ngkit.binding import check_component
from ngkit.cli.main import main
from ngkit.components import ImageSpec, LatentSpec
from ngkit.engine.load import load_run
from ngkit.engine.train_loop import train
from ngkit.errors import PluginError, RecipeError
from ngkit.export import export
from ngkit.plugins import get_registry
from ngkit.recipe import parse_recipe
from ngkit_plugins.embedded_data import Digits
from ngkit_plugins.vq_lib import QUANTIZERS, LibraryQuantizer
from tiny_recipe import tiny

vqp = pytest.importorskip("vector_quantize_pytorch")

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = {"run": {"steps": 2, "eval_every": 0, "checkpoint_every": 0}, "eval": {"metrics": ["mse"], "num_images": 16}}
# Small per-level widths keep each case to a few seconds; tiny's latent is 4x4 tokens of 16 codes.
SMALL = {"vq": {"dim": 8}, "rvq": {"dim": 8}, "simvq": {"dim": 8}, "rsimvq": {"dim": 8}}


def build(name: str, codes: int = 16, **options) -> LibraryQuantizer:
    return ngkit.quantizer(name, codes=codes, **{**SMALL.get(name, {}), **options})


def vqvae_run(out: Path, quantizer: str | dict) -> Path:
    train(parse_recipe(tiny(method={"name": "vqvae", "quantizer": quantizer}, **SHORT), "tiny"), out, quiet=True)
    return out


def test_at_least_eight_library_quantizers_are_registered() -> None:
    names = set(get_registry().names("quantizers"))
    assert set(QUANTIZERS) <= names and len(set(QUANTIZERS) - {"vq", "fsq"}) >= 8
    assert get_registry().entries["quantizers"]["fsq"].plugin == "vq_lib"  # ngkit's own VQ/FSQ replaced


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_round_trip_train_export_load_equals_the_trained_model(name: str, tmp_path: Path) -> None:
    run = vqvae_run(tmp_path / "run", {"name": name, **SMALL.get(name, {})})
    export(run, tmp_path / "export")
    images = next(data.test_batches(Digits(), 32, 0, 1, 32))
    trained = load_run(run).engine.module.eval()  # loaded by DeepSpeed, as `ngkit eval` does
    want_codes = trained.encode(images)
    want_images = trained.decode(want_codes).float().clamp(0, 1)
    tok = ngkit.load(tmp_path / "export")
    codes = tok.encode(images)
    assert codes.shape == (32, 16) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 16
    assert torch.equal(codes, want_codes)
    assert torch.equal(tok.decode(codes), want_images)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_codes_stand_for_the_vectors_forward_returns(name: str) -> None:
    torch.manual_seed(0)
    q = build(name).eval()
    h = torch.randn(4, 6, q.dim)
    with torch.no_grad():
        quantized, codes, _, _ = q(h)
        torch.testing.assert_close(q.codes_to_vectors(codes), quantized, atol=1e-5, rtol=1e-5)
    assert codes.shape == (4, 6) and 0 <= codes.min() and codes.max() < 16


@pytest.mark.parametrize("name", ["rvq", "rfsq", "rlfq", "rsimvq"])
def test_residual_codes_combine_the_levels_least_significant_first(name: str) -> None:
    """Q = 2 levels of C = 4 codes: token code c0 + 4 c1, and back."""
    torch.manual_seed(0)
    q = build(name, num_quantizers=2).eval()
    assert (q.level_codes, q.levels) == (4, 2)
    h = torch.randn(3, 5, q.dim)
    with torch.no_grad():
        _, indices, *_ = q.module(h)  # the library's own [B, L, Q] indices
        _, codes, _, _ = q(h)
    assert indices.shape == (3, 5, 2)
    assert torch.equal(codes, indices[..., 0].long() + 4 * indices[..., 1].long())
    assert torch.equal(q.split(codes), indices.long())
    assert torch.equal(q.split(torch.arange(16)).view(16, 2)[:, 0] + 4 * q.split(torch.arange(16)).view(16, 2)[:, 1],
                       torch.arange(16))


def test_auxiliary_losses_reach_the_loss_in_nats_per_image() -> None:
    """The library's loss times the pixel count (the default aux_weight), added to the loss and logged."""
    torch.manual_seed(0)
    image, latent = ImageSpec(1, 8, 8), LatentSpec((2, 2), 16)
    q = QUANTIZERS["simvq"](latent=latent, image=image, dim=8)
    h = torch.randn(2, 4, 8, requires_grad=True)
    quantized, codes, aux, logs = q(h)
    e = q.module.codebook.detach()[codes]
    mse = (h.detach() - e).pow(2).mean()
    assert aux.item() == pytest.approx(64 * (1 + 0.25) * mse.item(), rel=1e-5)  # codebook + 0.25 commitment
    assert logs["q_aux"].item() == pytest.approx(aux.item())
    aux.backward()
    assert h.grad.abs().sum() > 0  # the commitment term pulls the encoder output
    assert QUANTIZERS["simvq"](latent=latent, image=image, dim=8, aux_weight=2.0).aux_weight == 2.0


def test_the_vqvae_method_logs_the_quantizer_losses(tmp_path: Path) -> None:
    result = train(parse_recipe(tiny(method={"name": "vqvae", "quantizer": "rlfq"}, **SHORT), "tiny"),
                   tmp_path / "run", quiet=True)
    logged = [r for r in result.records if r.get("kind") == "train"]
    assert logged and all(key in logged[-1] for key in ("q_aux", "q_level0_used", "q_level1_used", "codes_used"))


LIBRARY_CLASSES = {
    "vq": ["VectorQuantize"], "rvq": ["ResidualVQ", "VectorQuantize"], "fsq": ["FSQ"],
    "rfsq": ["ResidualFSQ", "FSQ"], "lfq": ["LFQ"], "bsq": ["LFQ"], "rlfq": ["ResidualLFQ", "LFQ"],
    "simvq": ["SimVQ"], "rsimvq": ["ResidualSimVQ", "SimVQ"], "latent-quant": ["LatentQuantize"],
    "binary-mapper": ["BinaryMapper"],
}
# Options whose default is ngkit's because the library has none (or derives it from V): docs/baselines.md.
NGKIT_DEFAULTS = {"dim", "levels", "num_quantizers"}


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_defaults_are_the_librarys(name: str) -> None:
    ours = inspect.signature(QUANTIZERS[name]).parameters
    checked = 0
    for key, param in ours.items():
        if key in NGKIT_DEFAULTS or key in ("latent", "image", "aux_weight", "temperature"):
            continue
        for cls in LIBRARY_CLASSES[name]:
            theirs = inspect.signature(getattr(vqp, cls)).parameters
            if key in theirs:
                assert param.default == theirs[key].default, (name, key, cls)
                checked += 1
                break
        else:
            pytest.fail(f"{name}: option {key} is not an option of {LIBRARY_CLASSES[name]}")
    assert checked >= 1


def test_option_errors_name_the_quantizer_and_the_key() -> None:
    registry = get_registry()
    problems = check_component("methods", {"name": "vqvae", "quantizer": {"name": "rvq", "num_quantizer": 2}},
                               "method", registry)
    assert problems == [
        '[method.quantizer.num_quantizer] unknown option for quantizers "rvq"; did you mean "num_quantizers"? '
        "(options: num_quantizers, dim, codebook_dim, shared_codebook, decay, commitment_weight, kmeans_init, "
        "kmeans_iters, use_cosine_sim, threshold_ema_dead_code, rotation_trick, learnable_codebook, ema_update, "
        "aux_weight)"
    ]
    problems = check_component("methods", {"name": "vqvae", "quantizer": {"name": "lfq", "entropy_loss_weight": "high"}},
                               "method", registry)
    assert len(problems) == 1 and problems[0].startswith("[method.quantizer.entropy_loss_weight]")
    with pytest.raises(RecipeError, match=r"\[method.quantizer\] quantizer \"rvq\".*num_quantizers = 3.*\[1, 2, 4\]"):
        ngkit.Tokenizer.new(method="vqvae", quantizer={"name": "rvq", "num_quantizers": 3}, codes=16,
                            image_size=8, channels=1, patch_size=2)
    with pytest.raises(RecipeError, match=r'quantizer "fsq".*levels = \[8, 8\] give 64 codes.*16 are needed'):
        ngkit.quantizer("fsq", codes=16, levels=[8, 8])
    with pytest.raises(RecipeError, match=r'quantizer "lfq".*power of two.*\[model\] codes to 16'):
        ngkit.quantizer("lfq", codes=10)
    with pytest.raises(RecipeError, match=r'quantizer "vq".*vector-quantize-pytorch refused'):
        ngkit.quantizer("vq", codes=16, kmeans_init=True, use_cosine_sim=True, learnable_codebook=True)


def test_a_missing_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vector_quantize_pytorch", None)  # `import` now raises ImportError
    assert "rvq" in get_registry().names("quantizers")  # still listed, so recipes validate
    with pytest.raises(RecipeError) as err:
        ngkit.quantizer("rvq", codes=16)
    assert 'quantizer "rvq" comes from the vector-quantize-pytorch package' in str(err.value)
    assert 'pip install "ngkit[quantizers]"' in str(err.value)
    with pytest.raises(PluginError, match=r"ngkit\[quantizers\]"):
        QUANTIZERS["lfq"](latent=LatentSpec((1, 1), 16), image=ImageSpec(1, 1, 1))


@pytest.mark.parametrize("quantizer", ["rvq", "fsq"])
def test_codes_feed_a_prior(quantizer: str, tmp_path: Path) -> None:
    """One residual and one plain quantizer: `ngkit prior train` on their codes, then samples decode."""
    run = vqvae_run(tmp_path / "tokenizer", quantizer)
    recipe = tmp_path / "prior.toml"
    recipe.write_text(tomli_w.dumps({
        "prior": {"name": "autoregressive", "tokenizer": str(run), "width": 16, "depth": 1, "heads": 2},
        "data": {"name": "digits", "batch_size": 16},
        "run": {"steps": 3, "seed": 0, "log_every": 1, "checkpoint_every": 3},
        "eval": {"metrics": ["usage"], "num_images": 10, "batch_size": 10},
    }))
    assert main(["prior", "train", str(recipe), "--out", str(tmp_path / "prior"), "--quiet"]) == 0
    assert main(["sample", str(tmp_path / "prior"), "--num", "2", "--label", "3", "--out", str(tmp_path / "s")]) == 0
    codes = np.load(tmp_path / "s.npz")["codes"]
    assert codes.shape == (2, 16) and 0 <= codes.min() and codes.max() < 16


def test_the_example_in_docs_baselines_runs() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "baselines.md").read_text()
    blocks = text.split("```python\n")[1:]
    assert len(blocks) == 1, "docs/baselines.md: one python example, run here"
    scope: dict = {}
    exec(blocks[0].split("```")[0], scope)  # noqa: S102 - our own documentation
    assert scope["codes"].shape == (4, 16) and scope["codes"].max() < 256 and scope["aux"].dim() == 0
    assert scope["images"].shape == (2, 3, 32, 32)
    assert repr(scope["tok"]) == "Tokenizer(fsq: 3x32x32 images <-> 4x4 tokens of 256 codes, step 0, cpu)"


def test_tokenizer_new_builds_with_the_registered_plugins() -> None:
    tok = ngkit.Tokenizer.new(method="vqvae", quantizer="rfsq", codes=16, image_size=8, channels=1, patch_size=2,
                              encoder={"name": "transformer", "width": 16, "depth": 1, "heads": 2})
    assert (tok.latent.grid, tok.latent.codes, tok.image.shape) == ((4, 4), 16, (1, 8, 8))
    assert tok.config["sources"]["method.quantizer"]["plugin"] == "vq_lib"
    assert not tok.method.training and tok.config["step"] == 0
    codes = tok.encode(torch.rand(3, 1, 8, 8))
    assert codes.shape == (3, 16) and tok.decode(codes).shape == (3, 1, 8, 8)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_nan_features_give_codes_in_range_and_a_nan_loss_or_output(name: str) -> None:
    """What a diverged step feeds the quantizer: codes stay valid; the NaN reaches the loss."""
    q = build(name)
    quantized, codes, aux, _ = q(torch.full((2, 3, q.dim), float("nan")))
    assert codes.min() >= 0 and codes.max() < 16
    assert not (torch.isfinite(quantized).all() and torch.isfinite(aux))
