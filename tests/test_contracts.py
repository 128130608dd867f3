"""The plugin contract is checked when a recipe is built (``recipes validate`` and ``run``), for
every component kind, with one message naming component, plugin, package, API and docs section;
the plugin API is versioned and an API-1 dataset runs through the adapter; a plugin raising in a
DataLoader worker is named, not a traceback."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import tomli_w
import torch

from fake_dists import install  # noqa: F401 (a fixture)
from ngkit import PLUGIN_API
from ngkit.binding import build_component
from ngkit.cli.main import main
from ngkit.components import ImageSpec, LatentSpec
from ngkit.contracts import CHANGES, CONTRACTS
from ngkit.errors import PluginError, RecipeError
from ngkit.plugins import KINDS, get_registry, reset_plugin_manager
from tiny_recipe import tiny

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-a-plugin.md"

# A component of each kind written against a contract that is not ngkit's: (kind, class source,
# what the message must say was found).
STALE = {
    "datasets": ("""
class Stale:
    def __init__(self):
        self.spec = ImageSpec(1, 8, 8)
    def train(self, *, seed, rank, world_size):
        while True:
            yield torch.zeros(1, 8, 8)
    def test(self, *, rank, world_size, limit):
        return iter(torch.zeros(4, 1, 8, 8)[rank::world_size])
""", "found train(*, seed, rank, world_size): no parameter epoch, shard, num_shards, start"),
    "encoders": ("""
class Stale(nn.Module):
    def log_prob(self, x):
        return x
""", "must accept log_prob(x, z); found log_prob(x)"),
    "decoders": ("""
class Stale(nn.Module):
    embed_dim = 4
    def embed(self, z): return z
    def forward(self, h): return h
    def mean(self, params): return params
""", "has no method log_prob(x, params)"),
    "methods": ("""
class Stale(nn.Module):
    latent = None
    def forward(self, x): return x
    def encode(self, x): return x
    def decode(self, z): return z
""", "must accept forward(x, step); found forward(x)"),
    "posterior_proxies": ("""
class Stale:
    def __call__(self, logp, logq, eta): return logp
""", "must accept __call__(logp, logq, eta, beta)"),
    "step_size_policies": ("""
class Stale:
    def eta(self, logp, logq): return 1.0
    def update(self, logp, logq, beta): return {}
""", "must accept eta(logp, logq, beta); found eta(logp, logq)"),
    "beta_schedules": ("""
class Stale:
    def __call__(self): return 1.0
""", "must accept __call__(step)"),
    "quantizers": ("""
class Stale(nn.Module):
    dim = 4
    def forward(self, h): return h
    def after_step(self): return {}
""", "has no method codes_to_vectors(codes)"),
    "metrics": ("""
class Stale:
    def update(self, images, reconstructions): pass
    def compute(self): return {}
    def protocol(self): return {}
""", "must accept update(batch); found update(images, reconstructions)"),
    "losses": ("""
class Stale:
    def __call__(self, reconstructions): return reconstructions
""", "must accept __call__(images, reconstructions)"),
    "priors": ("""
class Stale(nn.Module):
    latent, classes = None, 0
    def loss(self, codes): return codes
    def sample(self, labels): return labels
""", "must accept loss(codes, labels); found loss(codes)"),
}


def stale_module(kind: str, api: int | None = None) -> str:
    header = "import torch\nfrom torch import nn\nfrom ngkit import hookimpl\nfrom ngkit.components import ImageSpec\n"
    if api is not None:
        header += f"NGKIT_PLUGIN_API = {api}\n"
    return header + STALE[kind][0] + f"\n@hookimpl\ndef {KINDS[kind]}(register):\n    register('stale', Stale)\n"


def use(monkeypatch, install, kind: str, api: int | None = None) -> None:
    install("ngkit-stale", {"stale": "stale_mod"}, {"stale_mod": stale_module(kind, api)})
    monkeypatch.setenv("NGKIT_PLUGINS", "stale")
    reset_plugin_manager()


def test_every_kind_has_a_contract_and_a_stale_case():
    assert set(CONTRACTS) == set(KINDS) == set(STALE)
    assert PLUGIN_API == max(CHANGES)


@pytest.mark.parametrize("kind", sorted(STALE))
def test_a_stale_component_of_each_kind_is_refused_with_one_clear_message(kind, install, monkeypatch):
    use(monkeypatch, install, kind)
    context = {"image": ImageSpec(1, 8, 8), "latent": LatentSpec((2, 2), 16), "total_steps": 10, "classes": 0}
    with pytest.raises(RecipeError) as info:
        build_component(kind, {"name": "stale"}, context, "here")
    [problem] = info.value.problems
    assert problem.startswith("[here] ")
    assert '"stale" (plugin stale (ngkit-stale 1.0)) does not meet the' in problem
    assert f"contract of plugin API {PLUGIN_API}" in problem
    assert STALE[kind][1] in problem
    assert f"set NGKIT_PLUGIN_API = {PLUGIN_API} in stale_mod" in problem
    assert f"See docs/writing-a-plugin.md{CONTRACTS[kind].section} (stale_mod:Stale)" in problem
    assert f"\n## {CONTRACTS[kind].section[1:].split('-', 1)[0]}. " in GUIDE.read_text()  # the section exists


def write(tmp_path: Path, name: str, raw: dict) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f"# Run: ngkit run {path}\n" + tomli_w.dumps(raw))
    return path


def stale_recipe(tmp_path: Path) -> Path:
    return write(tmp_path, "stale", tiny(data={"name": "stale", "batch_size": 4}, run={"steps": 2}))


def test_a_stale_dataset_fails_validate_and_run_alike_and_the_docs_quote_it(tmp_path, install, monkeypatch, capsys):
    use(monkeypatch, install, "datasets")
    recipe = stale_recipe(tmp_path)
    assert main(["recipes", "validate", str(recipe)]) == 2
    validated = capsys.readouterr().err
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    ran = capsys.readouterr().err
    expected = f"does not meet the dataset contract of plugin API {PLUGIN_API}: it must accept train(seed=, epoch=, shard=, num_shards=, start=)"
    assert expected in " ".join(validated.split()) and expected in " ".join(ran.split())
    assert "or set NGKIT_PLUGIN_API = 1 there to run it unchanged" in " ".join(ran.split())  # the way to the adapter
    assert "Traceback" not in ran and not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(RecipeError) as info:
        build_component("datasets", {"name": "stale"}, {}, "data")
    assert info.value.problems[0] in GUIDE.read_text()  # docs/writing-a-plugin.md quotes it verbatim


def test_an_api1_dataset_that_says_so_runs_through_the_adapter(tmp_path, install, monkeypatch, capsys):
    use(monkeypatch, install, "datasets", api=1)
    data = build_component("datasets", {"name": "stale"}, {}, "data")
    first = next(iter(data.train(seed=0, epoch=0, shard=0, num_shards=1, start=3)))
    assert first.load().shape == (1, 8, 8) and first.name == "image 3 of shard 0"
    assert len(list(data.test(shard=1, num_shards=2, limit=None))) == 2
    out = tmp_path / "run"
    assert main(["run", str(stale_recipe(tmp_path)), "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert (out / "summary.json").exists()


def test_a_package_written_for_a_newer_api_is_refused_at_load(install, monkeypatch):
    use(monkeypatch, install, "metrics", api=PLUGIN_API + 1)
    with pytest.raises(PluginError) as info:
        get_registry()
    msg = str(info.value)
    assert f'plugin "stale" (package ngkit-stale 1.0) declares NGKIT_PLUGIN_API = {PLUGIN_API + 1} in stale_mod' in msg
    assert f"speaks plugin API {PLUGIN_API}" in msg and "upgrade ngkit" in msg


def test_builtins_declare_the_current_api():
    import importlib

    from ngkit.plugins import get_plugin_manager

    modules = {info.module for info in get_plugin_manager().info.values() if info.builtin}
    assert modules and all(importlib.import_module(m).NGKIT_PLUGIN_API == PLUGIN_API for m in modules)


FAILING_DATA = """
import itertools
from functools import partial
import torch
from ngkit import hookimpl
from ngkit.components import Example, ImageSpec
NGKIT_PLUGIN_API = 2

class Failing:
    endless = True
    def __init__(self):
        self.spec = ImageSpec(1, 8, 8)
    def train(self, *, seed, epoch, shard, num_shards, start=0):
        for i in itertools.count(start):
            if epoch == 0 and i == 40:
                raise KeyError("label column 'y' not found")
            yield Example(partial(torch.zeros, 1, 8, 8), str(i))
    def test(self, *, shard, num_shards, limit):
        return iter(torch.zeros(4, 1, 8, 8)[shard::num_shards])

@hookimpl
def register_datasets(register):
    register("failing", Failing)
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataset_raising_in_a_dataloader_worker_is_named_not_a_traceback(tmp_path, install, monkeypatch, capsys, workers):
    install("ngkit-failing", {"failing": "failing_mod"}, {"failing_mod": FAILING_DATA})
    monkeypatch.setenv("NGKIT_PLUGINS", "failing")
    reset_plugin_manager()
    raw = tiny(data={"name": "failing", "batch_size": 4, "workers": workers},
               run={"steps": 20, "eval_every": 0, "checkpoint_every": 0})
    assert main(["run", str(write(tmp_path, "failing", raw)), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert 'dataset "failing" (plugin failing (ngkit-failing 1.0)) at [data] raised KeyError' in err
    assert "label column 'y' not found" in err and "failing_mod.py" in err
    assert "Traceback" not in err and "DataLoader worker" not in err


PIXEL_DATA = """
import itertools
from functools import partial
import torch
from ngkit import hookimpl
from ngkit.components import Example, ImageSpec
NGKIT_PLUGIN_API = {api}

def image(i, dtype):
    levels = torch.arange(64, dtype=torch.uint8).reshape(1, 8, 8) * 3 + i % 61
    return levels if dtype == "uint8" else levels.float() / 255

class Pixels:
    endless = True
    def __init__(self, dtype="float"):
        self.spec, self.dtype = ImageSpec(1, 8, 8), dtype
    def train(self, *, seed, epoch, shard, num_shards, start=0):
        for i in itertools.count(start * num_shards + shard, num_shards):
            yield Example(partial(image, i, self.dtype), f"img{{i}}")
    def test(self, *, shard, num_shards, limit):
        return iter([image(i, "float") for i in range(shard, 8, num_shards)])

@hookimpl
def register_datasets(register):
    register("{name}", Pixels)
"""


def pixel_run(tmp_path, install, monkeypatch, api: int, dtype: str, workers: int = 0) -> tuple[int, Path]:
    name = f"pixels{api}{dtype}{workers}"
    install(f"ngkit-{name}", {name: f"{name}_mod"}, {f"{name}_mod": PIXEL_DATA.format(api=api, name=name)})
    monkeypatch.setenv("NGKIT_PLUGINS", name)
    reset_plugin_manager()
    raw = tiny(data={"name": name, "dtype": dtype, "batch_size": 4, "workers": workers},
               run={"steps": 3, "eval_every": 0, "checkpoint_every": 0, "seed": 0})
    out = tmp_path / name
    return main(["run", str(write(tmp_path, name, raw)), "--out", str(out), "--quiet"]), out


def losses(out: Path) -> list[float]:
    import json

    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_api2_dataset_yielding_uint8_stops_with_a_contract_error_not_a_skip(tmp_path, install, monkeypatch, capsys, workers):
    # API 2 promised float pixels: an older ngkit trained on 0-255 values. The run stops naming the
    # image, the module and the fix; it is not counted as an unreadable file and nothing trains.
    assert CHANGES[3].startswith("a dataset's training Example.load() may return uint8")
    rc, out = pixel_run(tmp_path, install, monkeypatch, 2, "uint8", workers)
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2, err
    assert "training image 'img0' is uint8, but pixels2uint8" in err and "declares NGKIT_PLUGIN_API = 2" in err
    assert "Set NGKIT_PLUGIN_API = 3 in pixels2uint8" in err and "unreadable" not in err
    assert "Traceback" not in err and not losses(out)


def test_the_same_dataset_declaring_api3_trains_exactly_as_its_float_twin(tmp_path, install, monkeypatch, capsys):
    # uint8 under API 3 is divided by 255 once per batch: the losses equal those of the float twin
    # (float / 255 per image, declared API 2, behind FloatPixels) bit for bit.
    runs = [pixel_run(tmp_path, install, monkeypatch, api, dtype) for api, dtype in ((3, "uint8"), (2, "float"))]
    assert [rc for rc, _ in runs] == [0, 0], capsys.readouterr().err
    (_, new), (_, old) = runs
    assert losses(new) and losses(new) == losses(old)


def test_float_pixels_passes_everything_else_through(install, monkeypatch):
    from ngkit.contracts import FloatPixels

    install("ngkit-px", {"pixels": "px_mod"}, {"px_mod": PIXEL_DATA.format(api=2, name="pixels")})
    monkeypatch.setenv("NGKIT_PLUGINS", "pixels")
    reset_plugin_manager()
    data = build_component("datasets", {"name": "pixels"}, {}, "data")
    assert isinstance(data, FloatPixels) and data.endless is True and data.dtype == "float"
    [first] = itertools.islice(data.train(seed=0, epoch=0, shard=1, num_shards=2, start=2), 1)
    assert first.name == "img5" and torch.equal(first.load(), torch.arange(64.).reshape(1, 8, 8).mul(3).add(5) / 255)
    assert len(list(data.test(shard=0, num_shards=2, limit=None))) == 4
    assert not hasattr(data, "labelled")  # the dataset has none: neither has its adapter


def test_ngkit_plugins_shows_the_api_each_package_declares(install, monkeypatch, capsys):
    from ngkit.cli.plugins_cmd import plugin_rows

    install("ngkit-px", {"pixels": "px_mod"}, {"px_mod": PIXEL_DATA.format(api=2, name="pixels")})
    monkeypatch.setenv("NGKIT_PLUGINS", "pixels")
    reset_plugin_manager()
    rows = {r["name"]: r for r in plugin_rows()}
    assert rows["pixels"]["api"] == 2 and rows["conv_decoder"]["api"] == PLUGIN_API
    assert main(["plugins", "--external"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"2 (ngkit speaks {PLUGIN_API})" in out
