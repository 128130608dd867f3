"""The plugin manager: one loading path for built-ins and third-party plugins.

Plugins are modules named in the ``ngkit`` entry-point group. ngkit's own built-ins (package
``ngkit_plugins``) are listed there in ngkit's ``pyproject.toml`` like any other package's::

    [project.entry-points.ngkit]
    my_decoder = "my_package.my_decoder"

``NGKIT_PLUGINS`` chooses what loads: unset loads every installed plugin; empty loads only the
built-ins; a comma list loads the built-ins plus the named plugins (entry-point or package names).

A plugin that fails to import, an entry-point name two packages declare, or a component name two
plugins register is recorded as a :class:`PluginProblem`, not raised at once: ``ngkit plugins``
lists the rest and reports it, and :func:`get_registry` (what every command that builds a recipe
uses) raises one :class:`~ngkit.errors.PluginError` with every problem.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pluggy

from ngkit import PLUGIN_API, __version__, hookspecs
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
    "losses": "register_losses",
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
    "losses": "loss",
}


@dataclass(frozen=True)
class PluginInfo:
    name: str
    package: str
    version: str
    builtin: bool
    module: str = ""  # the entry point's value, e.g. "ngkit_plugins.conv_decoder"
    api: int | None = None  # the NGKIT_PLUGIN_API its module declares (None: undeclared)

    @property
    def label(self) -> str:
        return f'plugin "{self.name}" (package {self.package} {self.version})'


@dataclass(frozen=True)
class PluginProblem:
    """A plugin that did not load (``broken``), or a registration that was refused (``clash``)."""

    plugin: str
    package: str
    status: str  # "broken" or "clash"
    reason: str


@dataclass(frozen=True)
class Registration:
    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str

    @property
    def location(self) -> str:
        """``module:qualname`` of the factory, where to read its code."""
        module = getattr(self.factory, "__module__", "?")
        return f"{module}:{getattr(self.factory, '__qualname__', repr(self.factory))}"


@dataclass
class Registry:
    """Every named factory, by kind, with the plugin that registered it."""

    entries: dict[str, dict[str, Registration]] = field(default_factory=dict)
    problems: list[PluginProblem] = field(default_factory=list)
    # (kind, name) -> a sentence naming the excluded plugin that would provide it, or None
    excluded_hint: Callable[[str, str], str | None] = lambda kind, name: None

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
        excluded = self.excluded_hint(kind, name)
        return (
            f'{prefix}unknown {NOUNS.get(kind, kind)} name "{name}".{hint} '
            f"Registered: {listing} (see 'ngkit plugins')" + (f". {excluded}" if excluded else "")
        )


def _normalise(package: str) -> str:
    """PEP 503 form of a distribution name, so ``ngkit_eta_decay`` matches ``ngkit-eta-decay``."""
    return re.sub(r"[-_.]+", "-", package).lower()


def _dist_name(ep: importlib.metadata.EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "unknown"


def _info(ep: importlib.metadata.EntryPoint) -> PluginInfo:
    package = _dist_name(ep)
    version = ep.dist.version if ep.dist is not None else "unknown"
    builtin = _normalise(package) == BUILTIN_DISTRIBUTION
    return PluginInfo(ep.name, package, version, builtin, ep.value)


def _clash_fix(first: PluginInfo, second: PluginInfo, what: str) -> str:
    if first.builtin or second.builtin:
        other = second if first.builtin else first
        return f"rename {what} in {other.package}; ngkit's built-in names cannot change"
    return (
        f"rename {what} in one of the two packages, or load only one of them with "
        f"NGKIT_PLUGINS (e.g. NGKIT_PLUGINS={first.name} leaves out {second.name})"
    )


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus the package facts of each plugin, the plugins ``NGKIT_PLUGINS``
    left out, the problems met while loading, and the name registry."""

    def __init__(self) -> None:
        super().__init__("ngkit")
        self.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self.excluded: dict[str, PluginInfo] = {}
        self.problems: list[PluginProblem] = []
        self.selection: str | None = None  # the NGKIT_PLUGINS value it was loaded with
        self._excluded_eps: list[importlib.metadata.EntryPoint] = []
        self._excluded_registry: Registry | None = None
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

    def collect(self) -> Registry:
        """The registry, with clashing or failing registrations recorded rather than raised."""
        if self._registry is None:
            self._registry = self._collect()
        return self._registry

    @property
    def registry(self) -> Registry:
        """The registry; any load or registration problem is raised (all of them at once)."""
        registry = self.collect()
        problems = self.problems + registry.problems
        if problems:
            raise PluginError(problems_message(problems))
        return registry

    def _collect(self) -> Registry:
        registry = Registry(excluded_hint=self._excluded_hint)
        for kind, hook_name in KINDS.items():
            table: dict[str, Registration] = {}
            registry.entries[kind] = table
            # Registration order (built-ins load first), so a clash keeps the first and reports
            # the second.
            for impl in getattr(self.hook, hook_name).get_hookimpls():
                info = self.info.get(impl.plugin_name) or PluginInfo(impl.plugin_name, "?", "?", False)

                def register(name: str, factory: Callable[..., Any], _info: PluginInfo = info) -> None:
                    first = table.get(name)
                    if first is None:
                        table[name] = Registration(kind, name, factory, _info.name)
                        return
                    first_info = self.info.get(first.plugin) or PluginInfo(first.plugin, "?", "?", False)
                    registry.problems.append(PluginProblem(_info.name, _info.package, "clash", (
                        f'{NOUNS[kind]} "{name}" is registered twice: by {first_info.label} as '
                        f"{first.location} and by {_info.label} as "
                        f"{Registration(kind, name, factory, _info.name).location}. Names must be "
                        f"unique: {_clash_fix(first_info, _info, repr(name))}"
                    )))

                try:
                    impl.function(register=register)
                except Exception as exc:  # a plugin's bug must not hide the other plugins
                    registry.problems.append(PluginProblem(info.name, info.package, "broken", (
                        f"{info.label}: {hook_name} raised {type(exc).__name__}: {exc}. Fix the "
                        f"plugin, or leave it out with NGKIT_PLUGINS"
                    )))
        return registry

    def _excluded_hint(self, kind: str, name: str) -> str | None:
        """Which plugin left out by ``NGKIT_PLUGINS`` registers ``name`` (loads them on demand:
        this only runs to explain an unknown name)."""
        if not self._excluded_eps:
            return None
        if self._excluded_registry is None:
            scratch = PluginManager()
            for ep in self._excluded_eps:
                _load_one(scratch, ep)
            self._excluded_registry = scratch.collect()
        found = self._excluded_registry.entries.get(kind, {}).get(name)
        if found is None:
            return None
        info = self.excluded[found.plugin]
        return (
            f'"{name}" is provided by {info.label}, which is installed but left out by '
            f'NGKIT_PLUGINS="{self.selection}": add {info.name} (or its package, {info.package}) '
            f"to NGKIT_PLUGINS, or unset it to load every installed plugin"
        )

    def provides(self, plugin: str) -> dict[str, list[str]]:
        """kind -> names registered by one plugin."""
        return {kind: sorted(names) for kind, names in self.components(plugin).items()}

    def components(self, plugin: str) -> dict[str, dict[str, str]]:
        """kind -> {name: module:qualname} registered by one plugin."""
        out: dict[str, dict[str, str]] = {}
        for kind, table in self.collect().entries.items():
            found = {n: r.location for n, r in sorted(table.items()) if r.plugin == plugin}
            if found:
                out[kind] = found
        return out

    def hooks_of(self, plugin: str) -> list[str]:
        module = self.get_plugin(plugin)
        return sorted(c.name for c in self.get_hookcallers(module) or [])


def problems_message(problems: list[PluginProblem]) -> str:
    if len(problems) == 1:
        return problems[0].reason
    return f"{len(problems)} plugin problems:\n" + "\n".join(f"  - {p.reason}" for p in problems)


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, _dist_name(e)))


@dataclass
class Selection:
    """What ``NGKIT_PLUGINS`` picks from the installed entry points."""

    load: list[importlib.metadata.EntryPoint]
    excluded: list[importlib.metadata.EntryPoint]
    problems: list[PluginProblem]


def _name_clashes(
    eps: list[importlib.metadata.EntryPoint],
) -> tuple[list[importlib.metadata.EntryPoint], dict[str, PluginProblem]]:
    """One entry point per name, and the third-party entry points whose name another package
    also declares (they never load: a built-in keeps its name; between third parties, neither
    wins), each with the problem to report if it was asked for."""
    by_name: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in eps:
        by_name.setdefault(ep.name, []).append(ep)
    unique, clashes = [], {}
    for name, group in by_name.items():
        infos = [_info(ep) for ep in group]
        if len(group) == 1:
            unique.append(group[0])
            continue
        unique += [ep for ep, info in zip(group, infos) if info.builtin]
        third = [info for info in infos if not info.builtin]
        packages = " and ".join(f"{i.package} {i.version} ({i.module})" for i in infos)
        where = "([project.entry-points.ngkit] in its pyproject.toml) and reinstall it"
        if len(third) < len(infos):
            outcome = "only the built-in loads"
            fix = f"rename the entry point in {third[0].package} {where}; ngkit's built-in names cannot change"
        else:
            outcome = "neither loads"
            fix = f"rename the entry point in one of the packages {where}, or uninstall one of them"
        clashes[name] = PluginProblem(name, ", ".join(i.package for i in third), "clash", (
            f'plugin name "{name}" is declared by two packages: {packages}; {outcome}. Plugin '
            f"names must be unique: {fix}"
        ))
    return unique, clashes


def select_entry_points(selection: str | None) -> Selection:
    """Entry points to load for a ``NGKIT_PLUGINS`` value (None: unset); a name may be an
    entry-point name or a package name. A name clash is reported only if the variable would load
    one of the clashing plugins."""
    installed = _entry_points()
    eps, clashes = _name_clashes(installed)
    builtins = [ep for ep in eps if _info(ep).builtin]
    external = [ep for ep in eps if not _info(ep).builtin]
    if selection is None:
        return Selection(builtins + external, [], list(clashes.values()))
    wanted = [s.strip() for s in selection.split(",") if s.strip()]
    chosen: list[importlib.metadata.EntryPoint] = []
    problems: list[PluginProblem] = []

    def named(w: str, ep: importlib.metadata.EntryPoint) -> bool:
        return w == ep.name or _normalise(w) == _normalise(_dist_name(ep))

    for w in wanted:
        clashing = {clashes[ep.name].plugin: clashes[ep.name] for ep in installed
                    if ep.name in clashes and named(w, ep) and not _info(ep).builtin}
        problems += [p for p in clashing.values() if p not in problems]
        matches = [ep for ep in external if named(w, ep)]
        chosen += [ep for ep in matches if ep not in chosen]
        if matches or clashing:
            continue
        if any(w == ep.name for ep in builtins) or _normalise(w) == BUILTIN_DISTRIBUTION:
            continue  # built-ins always load
        listing = ", ".join(f"{ep.name} (package {_dist_name(ep)})" for ep in external) or "none"
        problems.append(PluginProblem(w, "-", "broken", (
            f'NGKIT_PLUGINS="{selection}" names "{w}", which is neither the entry-point name nor '
            f"the package of an installed plugin. Installed third-party plugins: {listing}; "
            f"fix the name or remove it (NGKIT_PLUGINS= loads only the built-ins)"
        )))
    return Selection(builtins + chosen, [ep for ep in external if ep not in chosen], problems)


def _load_one(pm: PluginManager, ep: importlib.metadata.EntryPoint) -> PluginProblem | None:
    """Import and register one plugin; a failure is returned, never raised."""
    info = _info(ep)
    try:
        module = ep.load()
    except Exception as exc:  # a broken plugin must not look like an ngkit bug
        return PluginProblem(info.name, info.package, "broken", (
            f"{info.label} failed to import {ep.value}: {type(exc).__name__}: {exc}. Leave it out "
            f"with NGKIT_PLUGINS set to the plugins you want (NGKIT_PLUGINS= loads only the "
            f"built-ins), or uninstall {info.package}"
        ))
    api = getattr(module, "NGKIT_PLUGIN_API", None)
    if api is not None and (type(api) is not int or not 1 <= api <= PLUGIN_API):
        return PluginProblem(info.name, info.package, "broken", (
            f"{info.label} declares NGKIT_PLUGIN_API = {api!r} in {ep.value}, but ngkit {__version__} "
            f"speaks plugin API {PLUGIN_API} (and reads 1 to {PLUGIN_API}): upgrade ngkit, or install a "
            f"version of {info.package} written for API {PLUGIN_API} (see docs/writing-a-plugin.md#plugin-api-versions)"
        ))
    info = dataclasses.replace(info, api=api)
    pm.add_plugin(module, info)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        pm.remove_plugin(info.name)
        return PluginProblem(info.name, info.package, "broken", (
            f"{info.label}: {exc}; hook names must match ngkit.hookspecs (check the spelling; "
            f"'ngkit plugins' lists the hooks ngkit knows)"
        ))
    return None


def load_plugins(pm: PluginManager, selection: str | None) -> None:
    """Load what ``selection`` picks into ``pm``, recording problems in ``pm.problems``."""
    chosen = select_entry_points(selection)
    pm.selection = selection
    pm.problems += chosen.problems
    pm._excluded_eps = chosen.excluded
    pm.excluded = {ep.name: _info(ep) for ep in chosen.excluded}
    for ep in chosen.load:
        problem = _load_one(pm, ep)
        if problem is not None:
            pm.problems.append(problem)
    try:
        pm.check_pending()  # plugins registered by hand before loading
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{exc} (hook names must match ngkit.hookspecs; check the spelling)") from exc


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide manager, loaded on first use according to ``NGKIT_PLUGINS``. Problems
    are recorded, not raised (see :func:`get_registry`)."""
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
    """Every registered name; raises :class:`PluginError` listing every plugin problem."""
    return get_plugin_manager().registry


@contextmanager
def temporary_plugin(module: object, name: str) -> Iterator[PluginManager]:
    """Register ``module`` as plugin ``name`` for the duration of a ``with`` block."""
    pm = get_plugin_manager()
    api = getattr(module, "NGKIT_PLUGIN_API", None)
    pm.add_plugin(module, PluginInfo(name, "(in-process)", "-", False, getattr(module, "__name__", ""), api))
    try:
        yield pm
    finally:
        pm.remove_plugin(name)


def _command_names(cli: Any, commands: int = 0, groups: int = 0) -> list[str]:
    """Names of a Typer app's commands and command groups (from the given positions on), as
    typed on the command line."""
    names = [c.name or c.callback.__name__.replace("_", "-") for c in cli.registered_commands[commands:]]
    return names + [g.name or "" for g in cli.registered_groups[groups:]]


def add_plugin_commands(cli: Any) -> list[str]:
    """Call ``register_commands(cli)`` of the selected third-party plugins; returns warnings.

    Only third-party plugins are imported here (no built-in adds commands), so ``ngkit --help``
    stays fast without them. A plugin that fails to import is skipped (``ngkit plugins`` and any
    command that builds a recipe report it); a hook that raises, or a command name ngkit already
    has, is skipped with a warning.
    """
    chosen = select_entry_points(os.environ.get("NGKIT_PLUGINS"))
    external = [ep for ep in chosen.load if not _info(ep).builtin]
    if not external:
        return []
    pm = PluginManager()
    for ep in external:
        _load_one(pm, ep)
    warnings = []
    for impl in pm.hook.register_commands.get_hookimpls():
        info = pm.info[impl.plugin_name]
        before = _command_names(cli)
        n_commands, n_groups = len(cli.registered_commands), len(cli.registered_groups)
        try:
            impl.function(cli=cli)
        except Exception as exc:
            del cli.registered_commands[n_commands:], cli.registered_groups[n_groups:]
            warnings.append(
                f"{info.label}: register_commands raised {type(exc).__name__}: {exc}; its commands "
                f"are left out (fix the plugin, or leave it out with NGKIT_PLUGINS)"
            )
            continue
        added = _command_names(cli, n_commands, n_groups)
        taken = [name for name in added if name in before]
        if taken:
            del cli.registered_commands[n_commands:], cli.registered_groups[n_groups:]
            warnings.append(
                f"{info.label} adds the command {', '.join(taken)}, which ngkit or another plugin "
                f"already has; its commands are left out (rename them in {info.package})"
            )
    return warnings
