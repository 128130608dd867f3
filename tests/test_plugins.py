"""Plugin loading: entry points, NGKIT_PLUGINS, duplicate names, broken plugins, typos in hooks,
call order, and where each component lives.

Third-party packages are real installed distributions (see ``fake_dists.py``).
"""

from __future__ import annotations

import importlib.metadata
import types
from pathlib import Path

import pytest
from fake_dists import install  # noqa: F401 (a fixture)

from ngkit import hookimpl
from ngkit.cli.plugins_cmd import plugin_rows
from ngkit.errors import NgkitError, PluginError
from ngkit.plugins import (
    KINDS,
    PluginManager,
    get_plugin_manager,
    get_registry,
    load_plugins,
    reset_plugin_manager,
    select_entry_points,
    temporary_plugin,
)


GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-a-plugin.md"


def use_plugins(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("NGKIT_PLUGINS", value)
    reset_plugin_manager()


DECODER_CONV = """
from ngkit import hookimpl

class MyConv:
    pass

@hookimpl
def register_decoders(register):
    register("conv", MyConv)
"""

ETA_X = """
from ngkit import hookimpl

class EtaX:
    pass

@hookimpl
def register_step_size_policies(register):
    register("eta-x", EtaX)
"""


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
    assert pm.problems == [] and pm.collect().problems == []


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


def test_every_component_shows_its_module_and_class():
    pm = get_plugin_manager()
    assert pm.components("conv_decoder") == {"decoders": {"conv": "ngkit_plugins.conv_decoder:ConvDecoder"}}
    for row in plugin_rows():
        for found in row["components"].values():
            assert all(":" in where and where.startswith("ngkit_plugins.") for where in found.values())


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


def test_third_party_duplicate_component_names_both_packages_and_says_rename(install, monkeypatch):
    install("ngkit-my-conv", {"my_conv": "my_conv_mod"}, {"my_conv_mod": DECODER_CONV})
    use_plugins(monkeypatch, "my_conv")
    with pytest.raises(PluginError) as info:
        get_registry()
    msg = str(info.value)
    assert 'decoder "conv" is registered twice' in msg
    assert 'plugin "conv_decoder" (package ngkit 0.1.0) as ngkit_plugins.conv_decoder:ConvDecoder' in msg
    assert 'plugin "my_conv" (package ngkit-my-conv 1.0) as my_conv_mod:MyConv' in msg
    assert "rename 'conv' in ngkit-my-conv; ngkit's built-in names cannot change" in msg
    assert "NGKIT_PLUGINS" not in msg  # a built-in cannot be switched off
    assert f"```\n{msg}\n```" in GUIDE.read_text()  # docs/writing-a-plugin.md quotes it verbatim
    # `ngkit plugins` still lists everything, the built-in keeps its name, the clash is shown
    rows = {(r["name"], r["status"]): r for r in plugin_rows(include_unloaded=True)}
    assert rows[("conv_decoder", "loaded")]["components"] == {"decoders": {"conv": "ngkit_plugins.conv_decoder:ConvDecoder"}}
    assert "registered twice" in rows[("my_conv", "clash")]["reason"]


def test_duplicate_entry_point_names_name_both_packages(install, monkeypatch):
    install("pkg-one", {"shapes": "shapes_one"}, {"shapes_one": ETA_X})
    install("pkg-two", {"shapes": "shapes_two"}, {"shapes_two": ETA_X.replace("eta-x", "eta-y")})
    use_plugins(monkeypatch, "shapes")
    with pytest.raises(PluginError) as info:
        get_registry()
    msg = str(info.value)
    assert 'plugin name "shapes" is declared by two packages: pkg-one 1.0 (shapes_one) and pkg-two 1.0 (shapes_two)' in msg
    assert "neither loads" in msg and "rename the entry point in one of the packages ([project.entry-points.ngkit]" in msg
    assert msg.endswith("and reinstall it, or uninstall one of them")
    rows = plugin_rows(include_unloaded=True)
    assert [r["status"] for r in rows if r["name"] == "shapes"] == ["clash"]
    assert "conv_decoder" in {r["name"] for r in rows}
    use_plugins(monkeypatch, "")  # not asked for: nothing to report
    assert "eta-x" not in get_registry().names("step_size_policies")


def test_third_party_entry_point_named_like_a_builtin_leaves_the_builtin(install, monkeypatch):
    install("ngkit-my-conv", {"conv_decoder": "my_conv_mod"}, {"my_conv_mod": DECODER_CONV})
    monkeypatch.delenv("NGKIT_PLUGINS")
    reset_plugin_manager()
    with pytest.raises(PluginError) as info:
        get_registry()
    msg = str(info.value)
    assert 'plugin name "conv_decoder" is declared by two packages' in msg and "only the built-in loads" in msg
    assert msg.endswith(
        "rename the entry point in ngkit-my-conv ([project.entry-points.ngkit] in its pyproject.toml) and "
        "reinstall it; ngkit's built-in names cannot change"
    )
    assert get_plugin_manager().collect().entries["decoders"]["conv"].plugin == "conv_decoder"


def test_broken_plugin_is_reported_and_the_rest_still_listed(install, monkeypatch):
    install("ngkit-broken", {"broken": "broken_mod"}, {"broken_mod": "import no_such_module_xyz\n"})
    use_plugins(monkeypatch, "broken")
    with pytest.raises(PluginError) as info:
        get_registry()
    msg = str(info.value)
    assert 'plugin "broken" (package ngkit-broken 1.0) failed to import broken_mod' in msg
    assert "no_such_module_xyz" in msg and "NGKIT_PLUGINS" in msg and "uninstall ngkit-broken" in msg
    rows = plugin_rows(include_unloaded=True)
    assert {r["status"] for r in rows if r["name"] == "broken"} == {"broken"}
    assert sum(r["status"] == "loaded" for r in rows) == len(builtin_entry_points())


def test_registration_hook_that_raises_is_reported_not_fatal_to_listing(install, monkeypatch):
    source = "from ngkit import hookimpl\n\n@hookimpl\ndef register_metrics(register):\n    raise RuntimeError('boom')\n"
    install("ngkit-boom", {"boom": "boom_mod"}, {"boom_mod": source})
    use_plugins(monkeypatch, "boom")
    with pytest.raises(PluginError, match="register_metrics raised RuntimeError: boom"):
        get_registry()
    assert any(r["status"] == "broken" and r["name"] == "boom" for r in plugin_rows(include_unloaded=True))


def test_hook_typo_is_reported_with_the_plugin(install, monkeypatch):
    source = "from ngkit import hookimpl\n\n@hookimpl\ndef register_decoder(register):\n    pass\n"
    install("ngkit-typo", {"typo": "typo_mod"}, {"typo_mod": source})
    use_plugins(monkeypatch, "typo")
    with pytest.raises(PluginError) as info:
        get_registry()
    assert "register_decoder" in str(info.value) and 'plugin "typo" (package ngkit-typo 1.0)' in str(info.value)


def test_hook_typo_registered_by_hand_fails_loudly():
    pm = PluginManager()
    bad = types.ModuleType("bad")
    bad.register_decoder = hookimpl(lambda register: None)  # missing "s"
    pm.register(bad, name="bad")
    with pytest.raises(PluginError, match="register_decoder"):
        load_plugins(pm, "")


def test_ngkit_plugins_accepts_entry_point_or_package_name(install, monkeypatch):
    install("ngkit-eta-x", {"eta_x": "eta_x_mod"}, {"eta_x_mod": ETA_X})
    for value in ("eta_x", "ngkit-eta-x", "ngkit_eta_x"):
        use_plugins(monkeypatch, value)
        assert "eta-x" in get_registry().names("step_size_policies"), value


def test_ngkit_plugins_unknown_name_lists_installed_plugins(install, monkeypatch):
    install("ngkit-eta-x", {"eta_x": "eta_x_mod"}, {"eta_x_mod": ETA_X})
    use_plugins(monkeypatch, "eta-x")  # the component name, not the plugin's
    with pytest.raises(PluginError) as info:
        get_registry()
    msg = str(info.value)
    assert 'NGKIT_PLUGINS="eta-x" names "eta-x", which is neither the entry-point name nor the package' in msg
    assert "eta_x (package ngkit-eta-x)" in msg


def test_ngkit_plugins_empty_selects_only_builtins():
    chosen = select_entry_points("")
    assert {ep.name for ep in chosen.load} == set(builtin_entry_points())


def test_unknown_name_says_which_excluded_plugin_provides_it(install, monkeypatch):
    install("ngkit-eta-x", {"eta_x": "eta_x_mod"}, {"eta_x_mod": ETA_X})
    use_plugins(monkeypatch, "")
    with pytest.raises(NgkitError) as info:
        get_registry().get("step_size_policies", "eta-x")
    msg = str(info.value)
    assert 'unknown step-size policy name "eta-x"' in msg
    assert ('"eta-x" is provided by plugin "eta_x" (package ngkit-eta-x 1.0), which is installed but '
            'left out by NGKIT_PLUGINS="": add eta_x (or its package, ngkit-eta-x) to NGKIT_PLUGINS') in msg
    excluded = [r for r in plugin_rows(include_unloaded=True) if r["status"] == "excluded"]
    assert [(r["name"], r["reason"]) for r in excluded] == [("eta_x", 'left out by NGKIT_PLUGINS=""')]
    assert "eta_x" not in {r["name"] for r in plugin_rows()}


def test_run_hooks_are_called_last_registered_first_as_documented():
    calls: list[str] = []

    def plugin(tag: str, **opts) -> types.SimpleNamespace:
        return types.SimpleNamespace(on_step_end=hookimpl(**opts)(lambda run, step, logs: calls.append(tag)))

    with temporary_plugin(plugin("a"), "a"), temporary_plugin(plugin("b"), "b"):
        with temporary_plugin(plugin("first", tryfirst=True), "first"):
            get_plugin_manager().hook.on_step_end(run=None, step=1, logs={})
    assert calls == ["first", "b", "a"]
    import ngkit.hookspecs

    assert "last-registered first" in ngkit.hookspecs.__doc__


def test_registration_hooks_run_again_after_a_plugin_is_added():
    runs: list[int] = []
    plugin = types.SimpleNamespace(register_metrics=hookimpl(lambda register: runs.append(1)))
    with temporary_plugin(plugin, "counter"):
        get_registry()
        get_registry()
        assert len(runs) == 1  # cached while nothing changes
        with temporary_plugin(types.SimpleNamespace(), "other"):
            get_registry()
        assert len(runs) == 2


def test_every_kind_has_a_hook():
    pm = PluginManager()
    for hook in KINDS.values():
        assert hasattr(pm.hook, hook)


def test_two_third_party_plugins_with_one_component_name_say_how_to_choose(install, monkeypatch):
    install("pkg-a", {"eta_a": "eta_a_mod"}, {"eta_a_mod": ETA_X})
    install("pkg-b", {"eta_b": "eta_b_mod"}, {"eta_b_mod": ETA_X})
    use_plugins(monkeypatch, "eta_a,eta_b")
    with pytest.raises(PluginError) as info:
        get_registry()
    msg = str(info.value)
    assert '(package pkg-a 1.0) as eta_a_mod:EtaX' in msg and '(package pkg-b 1.0) as eta_b_mod:EtaX' in msg
    assert "rename 'eta-x' in one of the two packages, or load only one of them with NGKIT_PLUGINS" in msg
    use_plugins(monkeypatch, "eta_a")  # the way out the message gives
    assert get_registry().get("step_size_policies", "eta-x").plugin == "eta_a"
