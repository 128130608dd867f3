"""Plugin loading: entry points, NGKIT_PLUGINS, duplicate names, broken plugins, typos in hooks."""

from __future__ import annotations

import importlib.metadata
import types

import pytest

from ngkit import hookimpl
from ngkit.errors import NgkitError, PluginError
from ngkit.plugins import (
    KINDS,
    PluginManager,
    get_plugin_manager,
    get_registry,
    load_plugins,
    select_entry_points,
    temporary_plugin,
)


def builtin_entry_points() -> dict[str, str]:
    return {
        ep.name: ep.value
        for ep in importlib.metadata.entry_points(group="ngkit")
        if ep.dist is not None and ep.dist.name == "ngkit"
    }


def test_every_builtin_module_is_an_entry_point_and_loads():
    pm = get_plugin_manager()
    eps = builtin_entry_points()
    assert set(pm.info) == set(eps)
    assert all(info.builtin and info.package == "ngkit" for info in pm.info.values())


@pytest.mark.parametrize(
    "kind, name",
    [
        ("datasets", "photos"),
        ("datasets", "digits"),
        ("datasets", "hf"),
        ("encoders", "transformer"),
        ("decoders", "conv"),
        ("decoders", "mlp"),
        ("methods", "daps"),
        ("methods", "daps-na"),
        ("posterior_proxies", "daps"),
        ("step_size_policies", "ess"),
        ("step_size_policies", "fixed"),
        ("step_size_policies", "kl"),
        ("beta_schedules", "exponential"),
        ("metrics", "psnr"),
        ("metrics", "fid"),
    ],
)
def test_builtin_names_are_registered(kind, name):
    assert name in get_registry().names(kind)


def test_unknown_name_lists_names_and_providers():
    with pytest.raises(NgkitError) as info:
        get_registry().get("encoders", "transfomer", where="r.toml [model.encoder]")
    msg = str(info.value)
    assert 'unknown encoder name "transfomer"' in msg
    assert 'Did you mean "transformer"' in msg
    assert "transformer (transformer_encoder)" in msg


def test_temporary_plugin_registers_then_disappears():
    class Fake:
        pass

    plugin = types.SimpleNamespace(register_decoders=hookimpl(lambda register: register("fake", Fake)))
    with temporary_plugin(plugin, "fake_plugin"):
        reg = get_registry().get("decoders", "fake")
        assert reg.factory is Fake and reg.plugin == "fake_plugin"
    assert "fake" not in get_registry().names("decoders")


def test_duplicate_name_names_both_plugins():
    plugin = types.SimpleNamespace(register_decoders=hookimpl(lambda register: register("conv", object)))
    with temporary_plugin(plugin, "impostor"):
        with pytest.raises(PluginError) as info:
            get_registry()
    assert "conv_decoder" in str(info.value) and "impostor" in str(info.value)


def test_hook_typo_fails_loudly():
    pm = PluginManager()
    bad = types.ModuleType("bad")
    bad.register_decoder = hookimpl(lambda register: None)  # missing "s"
    pm.register(bad, name="bad")
    with pytest.raises(PluginError, match="register_decoder"):
        load_plugins(pm, "")


def test_ngkit_plugins_unknown_name_is_an_error():
    with pytest.raises(PluginError, match="no-such-plugin"):
        select_entry_points("no-such-plugin")


def test_ngkit_plugins_empty_selects_only_builtins():
    names = {ep.name for ep in select_entry_points("")}
    assert names == set(builtin_entry_points())


def test_broken_plugin_import_error_says_how_to_disable(monkeypatch):
    ep = importlib.metadata.EntryPoint("broken", "no_such_module_xyz", "ngkit")
    monkeypatch.setattr("ngkit.plugins.select_entry_points", lambda selection: [ep])
    with pytest.raises(PluginError) as info:
        load_plugins(PluginManager(), None)
    msg = str(info.value)
    assert '"broken"' in msg and "NGKIT_PLUGINS" in msg and "no_such_module_xyz" in msg


def test_every_kind_has_a_hook():
    pm = PluginManager()
    for hook in KINDS.values():
        assert hasattr(pm.hook, hook)
