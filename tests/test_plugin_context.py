"""Context arguments by kind: each kind gets what binding.CONTEXT_BY_KIND says, and a factory
asking for one its kind does not get is refused when the recipe is validated, not after training."""

from __future__ import annotations

import types

import pytest

from ngkit import hookimpl
from ngkit.binding import CONTEXT_BY_KIND, check_component, factory_params
from ngkit.components import CONTEXT_ARGS, LatentSpec
from ngkit.engine.build import build
from ngkit.errors import RecipeError
from ngkit.plugins import KINDS, get_registry, temporary_plugin
from ngkit.recipe import parse_recipe
from tiny_recipe import tiny


class AreaMetric:
    def __init__(self, image) -> None:  # metrics get no context arguments
        self.image = image

    def update(self, batch) -> None: ...

    def compute(self) -> dict[str, float]:
        return {}

    def protocol(self) -> dict:
        return {}


def test_every_kind_has_a_context_rule():
    assert set(CONTEXT_BY_KIND) == set(KINDS)
    assert all(set(args) <= set(CONTEXT_ARGS) for args in CONTEXT_BY_KIND.values())


def test_builtin_factories_ask_only_for_context_their_kind_gets():
    registry = get_registry()
    for kind, table in registry.entries.items():
        for name, reg in table.items():
            asked = set(factory_params(reg.factory)[0]) & set(CONTEXT_ARGS)
            assert asked <= set(CONTEXT_BY_KIND[kind]), (kind, name, asked)


def test_metric_asking_for_image_is_refused_at_validation():
    plugin = types.SimpleNamespace(register_metrics=hookimpl(lambda register: register("area", AreaMetric)))
    with temporary_plugin(plugin, "area_plugin"):
        with pytest.raises(RecipeError) as info:
            parse_recipe(tiny(eval={"metrics": ["psnr", "area"]}), "r.toml")
    msg = str(info.value)
    assert '[eval.metrics.area] metric "area" (test_plugin_context:AreaMetric) asks for the context argument "image"' in msg
    assert "metrics get none. Remove the parameter and read batch.images and batch.latent in update()" in msg


class LatentStepSize:
    """A method's sub-component asking for the latent spec and the run length."""

    def __init__(self, *, latent: LatentSpec, total_steps: int, eta: float = 10.0) -> None:
        self.latent, self.total_steps, self.value = latent, total_steps, eta

    def eta(self, logp, logq, beta):
        import torch

        return torch.tensor(self.value)

    def update(self, logp, logq, beta):
        return {}


def test_sub_components_get_the_context_of_their_method():
    plugin = types.SimpleNamespace(
        register_step_size_policies=hookimpl(lambda register: register("latent-eta", LatentStepSize))
    )
    with temporary_plugin(plugin, "latent_eta"):
        recipe = parse_recipe(tiny(method={"name": "daps-na", "samples": 4, "step_size": "latent-eta"}), "r.toml")
        built = build(recipe)
    policy = built.method.step_size
    assert isinstance(policy, LatentStepSize)
    assert policy.latent == built.latent and policy.total_steps == recipe.run.steps


def test_dataset_asking_for_latent_is_refused():
    class Needy:
        def __init__(self, latent) -> None: ...

    plugin = types.SimpleNamespace(register_datasets=hookimpl(lambda register: register("needy", Needy)))
    with temporary_plugin(plugin, "needy"):
        problems = check_component("datasets", {"name": "needy"}, "data", get_registry())
    assert len(problems) == 1 and 'asks for the context argument "latent"' in problems[0]
    assert "a dataset takes only its recipe options and channels" in problems[0]
