"""``[data] channels``: grey datasets as RGB and RGB datasets as grey, for any dataset plugin,
and non-square patches (``[model] patch_size = [height, width]``) from the recipe to the models."""

from __future__ import annotations

import pytest
import torch

from ngkit.channels import LUMA, convert, converted_spec
from ngkit.components import ImageSpec
from ngkit.engine.build import build, build_dataset, latent_for
from ngkit.errors import RecipeError
from ngkit.recipe import parse_recipe
from tiny_recipe import tiny


def test_convert_repeats_grey_and_takes_the_luma_of_rgb():
    grey = torch.rand(2, 1, 4, 5)
    assert torch.equal(convert(grey, 3), grey.expand(2, 3, 4, 5))
    rgb = torch.rand(3, 4, 5)
    want = LUMA[0] * rgb[0] + LUMA[1] * rgb[1] + LUMA[2] * rgb[2]
    assert torch.allclose(convert(rgb, 1)[0], want) and convert(rgb, 3) is rgb


def test_converted_spec_keeps_the_mean_of_the_luma_exactly():
    spec = ImageSpec(3, 8, 8, (0.2, 0.4, 0.6), (0.1, 0.2, 0.3))
    grey = converted_spec(spec, 1)
    assert grey.shape == (1, 8, 8)
    assert grey.mean[0] == pytest.approx(0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6)
    assert grey.std[0] == pytest.approx(0.299 * 0.1 + 0.587 * 0.2 + 0.114 * 0.3)
    assert converted_spec(ImageSpec(1, 8, 8, (0.3,), (0.2,)), 3) == ImageSpec(3, 8, 8, (0.3,) * 3, (0.2,) * 3)


@pytest.mark.parametrize("name, have, want", [("digits", 1, 3), ("photos", 3, 1)])
def test_data_channels_converts_a_dataset_that_cannot_itself(name, have, want):
    extra = {"crop": 8, "test_images": 4} if name == "photos" else {}
    own = build_dataset(parse_recipe(tiny(data={"name": name, **extra}), "t"))
    assert own.spec.channels == have
    recipe = parse_recipe(tiny(data={"name": name, "channels": want, **extra}), "t")
    data = build_dataset(recipe)
    assert data.spec.shape == (want, 8, 8)
    img = next(iter(data.train(seed=0, epoch=0, shard=0, num_shards=1))).load()
    raw = next(iter(own.train(seed=0, epoch=0, shard=0, num_shards=1))).load()
    assert torch.allclose(img, convert(raw, want))
    assert torch.allclose(next(iter(data.test(shard=0, num_shards=1, limit=1))),
                          convert(next(iter(own.test(shard=0, num_shards=1, limit=1))), want))
    if name == "digits":  # labels survive the conversion (ngkit encode)
        assert [label for _, label in data.labelled("test")][:5] == own.labels["test"][:5]
    # The whole model is built for the converted images.
    built = build(recipe, data)
    x = torch.rand(2, want, 8, 8)
    assert built.method.decode(built.method.encode(x)).shape == x.shape


def test_data_channels_must_be_one_or_three():
    with pytest.raises(RecipeError, match=r"\[data.channels\]"):
        parse_recipe(tiny(data={"channels": 2}), "t")


def test_non_square_patches_make_a_non_square_grid():
    image = ImageSpec(1, 28, 28)
    assert latent_for(image, 256, [7, 14]).grid == (4, 2)
    assert latent_for(image, 256, 7).grid == (4, 4)
    with pytest.raises(RecipeError, match=r"\[8, 14\].*height must divide 28 \(1, 2, 4, 7, 14, 28\)"):
        latent_for(image, 256, [8, 14])
    recipe = parse_recipe(tiny(model={"patch_size": [2, 4]}), "t")
    assert recipe.model.patch == (2, 4)
    with pytest.raises(RecipeError, match=r"\[model.patch_size"):
        parse_recipe(tiny(model={"patch_size": [2, 0]}), "t")


def test_a_non_square_patch_feeds_only_its_own_token():
    """28 x 28 in 4 x 2 patches of 7 x 14: a pixel changes the patch embedding of exactly the
    token whose patch holds it (row-major over the grid), whatever its place in the patch."""
    from ngkit.components import LatentSpec
    from ngkit_plugins.transformer_encoder import TransformerEncoder

    image, latent = ImageSpec(1, 28, 28), LatentSpec((4, 2), 256)
    enc = TransformerEncoder(image=image, latent=latent, width=16, depth=1, heads=2, latent_depth=1, factorised=True)
    x = torch.rand(1, 1, 28, 28)
    base = enc.patches(x)
    assert base.shape == (1, 8, 16)
    for r, c in ((0, 0), (6, 13), (7, 0), (27, 14), (13, 20)):
        bumped = x.clone()
        bumped[0, 0, r, c] += 1
        changed = (enc.patches(bumped) - base).abs().sum(-1)[0] > 0
        assert changed.nonzero().flatten().tolist() == [(r // 7) * 2 + c // 14]


@pytest.mark.parametrize("decoder", ["conv", "mlp"])
def test_mnist_with_eight_tokens_builds_and_round_trips(decoder):
    """The paper's MNIST grid: 8 tokens of 7 x 14 from 28 x 28 grey digits, through the encoder,
    either decoder and a method, with the shapes ngkit checks at build time."""
    raw = tiny(data={"name": "mnist", "batch_size": 4},
               model={"codes": 256, "patch_size": [7, 14], "decoder": {"name": decoder, "embed_dim": 8}})
    built = build(parse_recipe(raw, "t"))
    assert built.latent.grid == (4, 2) and built.image.shape == (1, 28, 28)
    x = torch.rand(3, 1, 28, 28)
    z = built.method.encode(x)
    assert z.shape == (3, 8) and built.method.decode(z).shape == x.shape
    assert torch.isfinite(built.method(x, 0).loss)


def test_a_non_square_grid_survives_export_and_load(tmp_path):
    """Digits as RGB in 2 x 4 patches (a 4 x 2 grid): the export records grid, patch and
    channels, and ngkit.load encodes and decodes exactly as the trained model does."""
    import ngkit
    from ngkit.engine.train_loop import train
    from ngkit.export import export

    raw = tiny(data={"channels": 3}, model={"patch_size": [2, 4]},
               run={"steps": 2, "eval_every": 0, "checkpoint_every": 0}, eval={"metrics": ["mse"], "num_images": 8})
    out = tmp_path / "run"
    result = train(parse_recipe(raw, "t"), out, quiet=True)
    snap = export(out, tmp_path / "export")
    assert snap.config["latent"]["grid"] == [4, 2] and list(snap.config["latent"]["patch_size"]) == [2, 4]
    assert snap.config["image"]["channels"] == 3
    tok = ngkit.load(tmp_path / "export")
    x = torch.rand(3, 3, 8, 8)
    codes = tok.encode(x)
    assert codes.shape == (3, 8) and tok.decode(codes).shape == (3, 3, 8, 8)
    assert result.summary["tokens"] == 8
