"""The plugin manager: one loading path for built-ins and third-party plugins.

Plugins are modules named in the ``ngkit`` entry-point group. ngkit's own built-ins (package
``ngkit_plugins``) are listed there in ngkit's ``pyproject.toml`` like any other package's::

    [project.entry-points.ngkit]
    my_decoder = "my_package.my_decoder"

``NGKIT_PLUGINS`` chooses what loads: unset loads every installed plugin; empty loads only the
built-ins; a comma list loads the built-ins plus the named entry points.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pluggy

from ngkit import hookspecs
from ngkit.errors import NgkitError, PluginError

ENTRY_POINT_GROUP = "ngkit"
BUILTIN_DISTRIBUTION = "ngkit"

# kind (as in error messages and `ngkit plugins`) -> registration hook name
KINDS: dict[str, str] = {
    "datasets": "register_datasets",
    "encoders": "register_encoders",
    "decoders": "register_decoders",
    "methods": "register_methods",
    "posterior_proxies": "register_posterior_proxies",
    "step_size_policies": "register_step_size_policies",
    "beta_schedules": "register_beta_schedules",
    "quantizers": "register_quantizers",
    "metrics": "register_metrics",
    "priors": "register_priors",
}

# kind -> the singular noun used in messages
NOUNS: dict[str, str] = {
    "datasets": "dataset",
    "encoders": "encoder",
    "decoders": "decoder",
    "methods": "method",
    "posterior_proxies": "posterior proxy",
    "step_size_policies": "step-size policy",
    "beta_schedules": "beta schedule",
    "quantizers": "quantizer",
    "metrics": "metric",
    "priors": "prior",
}


@dataclass(frozen=True)
class PluginInfo:
    name: str
    package: str
    version: str
    builtin: bool


@dataclass(frozen=True)
class Registration:
    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str


@dataclass
class Registry:
    """Every named factory, by kind, with the plugin that registered it."""

    entries: dict[str, dict[str, Registration]] = field(default_factory=dict)

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries.get(kind, {}))

    def get(self, kind: str, name: str, where: str = "") -> Registration:
        """The registration for ``name``; an unknown name lists what exists and who provides it."""
        found = self.entries.get(kind, {}).get(name)
        if found is not None:
            return found
        raise NgkitError(self.unknown_message(kind, name, where))

    def unknown_message(self, kind: str, name: str, where: str = "") -> str:
        available = self.entries.get(kind, {})
        listing = ", ".join(f"{n} ({r.plugin})" for n, r in sorted(available.items())) or "none"
        close = difflib.get_close_matches(name, list(available), n=1)
        hint = f' Did you mean "{close[0]}"?' if close else ""
        prefix = f"{where}: " if where else ""
        return (
            f'{prefix}unknown {NOUNS.get(kind, kind)} name "{name}".{hint} '
            f"Registered: {listing} (see 'ngkit plugins')"
        )


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus the package facts of each plugin and the name registry."""

    def __init__(self) -> None:
        super().__init__("ngkit")
        self.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self._registry: Registry | None = None

    def add_plugin(self, module: object, info: PluginInfo) -> None:
        if self.has_plugin(info.name):
            other = self.info.get(info.name)
            raise PluginError(
                f'two plugins are named "{info.name}": from {info.package} and '
                f"{other.package if other else 'another registration'}; rename one entry point"
            )
        self.register(module, name=info.name)
        self.info[info.name] = info
        self._registry = None

    def remove_plugin(self, name: str) -> None:
        self.unregister(name=name)
        self.info.pop(name, None)
        self._registry = None

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = self._collect()
        return self._registry

    def _collect(self) -> Registry:
        registry = Registry()
        for kind, hook_name in KINDS.items():
            table: dict[str, Registration] = {}
            registry.entries[kind] = table
            for impl in reversed(getattr(self.hook, hook_name).get_hookimpls()):
                plugin = impl.plugin_name

                def register(name: str, factory: Callable[..., Any], _plugin: str = plugin) -> None:
                    if name in table:
                        raise PluginError(
                            f'{NOUNS[kind]} "{name}" is registered twice: by '
                            f'plugin "{table[name].plugin}" and by plugin "{_plugin}"; '
                            f"disable one with NGKIT_PLUGINS"
                        )
                    table[name] = Registration(kind, name, factory, _plugin)

                impl.function(register=register)
        return registry

    def provides(self, plugin: str) -> dict[str, list[str]]:
        """kind -> names registered by one plugin."""
        out: dict[str, list[str]] = {}
        for kind, table in self.registry.entries.items():
            names = [n for n, r in table.items() if r.plugin == plugin]
            if names:
                out[kind] = sorted(names)
        return out

    def hooks_of(self, plugin: str) -> list[str]:
        module = self.get_plugin(plugin)
        return sorted(c.name for c in self.get_hookcallers(module) or [])


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)


def _dist_name(ep: importlib.metadata.EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "unknown"


def select_entry_points(selection: str | None) -> list[importlib.metadata.EntryPoint]:
    """Entry points to load for a ``NGKIT_PLUGINS`` value (None: unset)."""
    eps = _entry_points()
    builtins = [ep for ep in eps if _dist_name(ep) == BUILTIN_DISTRIBUTION]
    external = {ep.name: ep for ep in eps if _dist_name(ep) != BUILTIN_DISTRIBUTION}
    if selection is None:
        return builtins + list(external.values())
    wanted = [s.strip() for s in selection.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in external and w not in {b.name for b in builtins}]
    if unknown:
        raise PluginError(
            f"NGKIT_PLUGINS names {', '.join(unknown)}, which no installed package provides. "
            f"Installed third-party plugins: {', '.join(sorted(external)) or 'none'}"
        )
    return builtins + [external[w] for w in wanted if w in external]


def load_plugins(pm: PluginManager, selection: str | None) -> None:
    for ep in select_entry_points(selection):
        package = _dist_name(ep)
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not look like an ngkit bug
            raise PluginError(
                f'plugin "{ep.name}" (package {package}, module {ep.value}) failed to import: '
                f"{type(exc).__name__}: {exc}. Disable it with NGKIT_PLUGINS set to the plugins "
                f"you want (NGKIT_PLUGINS= loads only the built-ins), or uninstall {package}."
            ) from exc
        version = ep.dist.version if ep.dist is not None else "unknown"
        pm.add_plugin(module, PluginInfo(ep.name, package, version, package == BUILTIN_DISTRIBUTION))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{exc} (hook names must match ngkit.hookspecs; check the spelling)") from exc


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide manager, loaded on first use according to ``NGKIT_PLUGINS``."""
    global _manager
    if _manager is None:
        pm = PluginManager()
        load_plugins(pm, os.environ.get("NGKIT_PLUGINS"))
        _manager = pm
    return _manager


def reset_plugin_manager() -> None:
    """Forget the loaded manager; the next use reloads from entry points (tests, reruns)."""
    global _manager
    _manager = None


def get_registry() -> Registry:
    return get_plugin_manager().registry


@contextmanager
def temporary_plugin(module: object, name: str) -> Iterator[PluginManager]:
    """Register ``module`` as plugin ``name`` for the duration of a ``with`` block."""
    pm = get_plugin_manager()
    pm.add_plugin(module, PluginInfo(name, "(in-process)", "-", False))
    try:
        yield pm
    finally:
        pm.remove_plugin(name)
