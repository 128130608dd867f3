"""Binding recipe tables to registered factories: check options against signatures, then build.

A factory's parameters are of three sorts: *context* arguments the core fills in by name
(:data:`ngkit.components.CONTEXT_ARGS`), *sub-components* annotated with
:class:`ngkit.components.Ref` (a name, or a table with ``name`` and options, resolved in another
registry), and plain *options*, validated against their type hints with pydantic.
"""

from __future__ import annotations

import difflib
import inspect
import sys
import typing
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import TypeAdapter, ValidationError

from ngkit import PLUGIN_API
from ngkit.components import CONTEXT_ARGS, Ref
from ngkit.contracts import CONTRACTS, DOCS, DatasetV1Adapter, FloatPixels, api_note, contract_problems, looks_like_api1_dataset
from ngkit.errors import NgkitError, RecipeError
from ngkit.plugins import NOUNS, Registration, Registry, get_plugin_manager, get_registry
from ngkit.recipe import dataset_options

if typing.TYPE_CHECKING:
    from ngkit.recipe import Recipe

_EMPTY = inspect.Parameter.empty

_SHAPES = ("image", "latent", "total_steps")
# Which context arguments each kind of factory is given (engine/build.py fills them in). A
# method's sub-components (proxy, step size, quantizer) are built with the method's context.
# Datasets come first (the others are derived from them); metrics read the images and the latent
# spec from each EvalBatch instead, so the same metric serves `ngkit run` and `ngkit eval`.
CONTEXT_BY_KIND: dict[str, tuple[str, ...]] = {
    "datasets": ("channels",),  # one that declares it makes that many channels itself
    "encoders": _SHAPES,
    "decoders": _SHAPES,
    "beta_schedules": _SHAPES,
    "methods": (*_SHAPES, "encoder", "decoder", "beta"),
    "posterior_proxies": _SHAPES,
    "step_size_policies": _SHAPES,
    "quantizers": _SHAPES,
    "metrics": (),
    "priors": ("latent", "classes"),  # the frozen tokenizer's latent spec, the dataset's label count
    "losses": _SHAPES,
}


@dataclass(frozen=True)
class Param:
    name: str
    annotation: Any  # resolved type, or None when it could not be resolved
    default: Any
    ref: Ref | None

    @property
    def required(self) -> bool:
        return self.default is _EMPTY


def _resolve(annotation: Any, factory: Callable[..., Any]) -> Any:
    if not isinstance(annotation, str):
        return annotation
    target = factory.__init__ if inspect.isclass(factory) else factory
    module = sys.modules.get(getattr(target, "__module__", ""), None)
    namespace = dict(vars(module)) if module else {}
    namespace.setdefault("Any", Any)
    try:
        return eval(annotation, namespace)  # noqa: S307 - annotations of installed plugins
    except Exception:
        return None


def factory_params(factory: Callable[..., Any]) -> tuple[dict[str, Param], bool]:
    """Parameters of a factory (and whether it takes ``**kwargs``)."""
    sig = inspect.signature(factory)
    params: dict[str, Param] = {}
    var_kw = False
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = True
            continue
        if p.kind is inspect.Parameter.VAR_POSITIONAL or p.name == "self":
            continue
        ann = _resolve(p.annotation, factory) if p.annotation is not _EMPTY else None
        ref = None
        if typing.get_origin(ann) is typing.Annotated:
            ref = next((m for m in ann.__metadata__ if isinstance(m, Ref)), None)
            ann = ann.__origin__
        params[p.name] = Param(p.name, ann, p.default, ref)
    return params, var_kw


def _as_table(value: Any) -> dict[str, Any] | None:
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return dict(value)
    return None


def _validate(param: Param, value: Any) -> Any:
    if param.annotation is None or param.annotation is Any:
        return value
    return TypeAdapter(param.annotation).validate_python(value)


def _short(exc: ValidationError) -> str:
    return "; ".join(e["msg"] for e in exc.errors())


_CONTEXT_FIX = {
    "metrics": "Remove the parameter and read batch.images and batch.latent in update()",
    "datasets": "Remove the parameter; a dataset takes only its recipe options and channels",
}


def check_component(kind: str, table: dict[str, Any], where: str, registry: Registry) -> list[str]:
    """Every problem with one component table, without building anything."""
    name = table.get("name")
    if not isinstance(name, str):
        return [f"[{where}] needs a name (a string): the registered {kind} to use"]
    if name not in registry.entries.get(kind, {}):
        return [f"[{where}] {registry.unknown_message(kind, name)}"]
    factory = registry.entries[kind][name].factory
    params, var_kw = factory_params(factory)
    options = {k: v for k, v in table.items() if k != "name"}
    given = CONTEXT_BY_KIND.get(kind, ())
    problems = [
        f'[{where}] {NOUNS[kind]} "{name}" ({registry.entries[kind][name].location}) asks for the '
        f'context argument "{p}", which ngkit gives only to '
        f"{', '.join(k for k, args in CONTEXT_BY_KIND.items() if p in args)}; {kind} get "
        f"{', '.join(given) or 'none'}. {_CONTEXT_FIX.get(kind, 'Remove the parameter')} "
        f"(see docs/writing-a-plugin.md)"
        for p in params
        if p in CONTEXT_ARGS and p not in given
    ]
    for key, value in options.items():
        if key in CONTEXT_ARGS and key in params:
            problems.append(f"[{where}.{key}] is set by ngkit ({CONTEXT_ARGS[key]}); remove it")
            continue
        param = params.get(key)
        if param is None:
            if var_kw:
                continue
            allowed = [p for p in params if p not in CONTEXT_ARGS]
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            problems.append(
                f'[{where}.{key}] unknown option for {kind} "{name}"{hint} '
                f"(options: {', '.join(allowed) or 'none'})"
            )
            continue
        if param.ref is not None:
            sub = _as_table(value)
            if sub is None:
                problems.append(
                    f"[{where}.{key}] expected a {param.ref.kind} name or a table with name; found {value!r}"
                )
            else:
                problems += check_component(param.ref.kind, sub, f"{where}.{key}", registry)
            continue
        try:
            _validate(param, value)
        except ValidationError as exc:
            problems.append(f"[{where}.{key}] {_short(exc)}; found {value!r}")
    for param in params.values():
        if param.required and param.name not in options and param.name not in CONTEXT_ARGS:
            problems.append(f'[{where}.{param.name}] is required by {kind} "{name}" but missing')
    return problems


def build_component(kind: str, table: dict[str, Any], context: dict[str, Any], where: str) -> Any:
    """Build one component (sub-components first), passing the context arguments it declares."""
    registry = get_registry()
    problems = check_component(kind, table, where, registry)
    if problems:
        raise RecipeError(where, problems)
    factory = registry.entries[kind][table["name"]].factory
    params, _ = factory_params(factory)
    kwargs: dict[str, Any] = {}
    for param in params.values():
        if param.name in CONTEXT_ARGS:
            if param.name in context and param.name in CONTEXT_BY_KIND.get(kind, ()):
                kwargs[param.name] = context[param.name]
            continue
        if param.ref is not None:
            value = table.get(param.name, param.default)
            sub = _as_table(value)
            if sub is not None:
                kwargs[param.name] = build_component(param.ref.kind, sub, context, f"{where}.{param.name}")
            elif param.name in table:
                kwargs[param.name] = value
            continue
        if param.name in table:
            kwargs[param.name] = _validate(param, table[param.name])
    extra = {k: v for k, v in table.items() if k != "name" and k not in params}
    registration = registry.entries[kind][table["name"]]
    try:
        built = factory(**kwargs, **extra)
    except RecipeError:  # a sub-component's problem, already located
        raise
    except Exception as exc:  # the plugin refused its options, or failed: a problem at this key
        raise RecipeError(where, [f"[{where}] {refusal(registration, exc)}"]) from exc
    built = _meet_contract(kind, built, registration, where)
    _remember(built, where, registration)
    return built


def _meet_contract(kind: str, built: Any, registration: Registration, where: str) -> Any:
    """``built`` checked against its kind's contract (:mod:`ngkit.contracts`); an API-1 dataset
    comes back behind its adapter. One problem names the component, plugin, package and version,
    what the contract expects and what was found, and the docs section."""
    info = get_plugin_manager().info.get(registration.plugin)
    declared = info.api if info else None
    module = info.module if info and info.module else registration.location.split(":")[0]
    if kind == "datasets" and declared == 1:
        built = DatasetV1Adapter(built)
    problems = contract_problems(kind, built)
    if not problems:
        return FloatPixels(built, declared, module) if kind == "datasets" and declared in (1, 2) else built
    api1 = kind == "datasets" and looks_like_api1_dataset(built)
    raise RecipeError(where, [
        f"[{where}] {component_label(registration)} does not meet the {NOUNS[kind]} contract of plugin API "
        f"{PLUGIN_API}: it {'; it '.join(problems)}.{api_note(declared, module, api1)} See "
        f"{DOCS}{CONTRACTS[kind].section} ({registration.location})"
    ])


def plugin_label(plugin: str) -> str:
    """``plugin conv_decoder (ngkit 0.1.0)``: the entry point and the package that ships it."""
    info = get_plugin_manager().info.get(plugin)
    return f"plugin {plugin} ({info.package} {info.version})" if info else f"plugin {plugin}"


def component_label(registration: Registration) -> str:
    """``decoder "conv" (plugin conv_decoder (ngkit 0.1.0))``."""
    return f'{NOUNS[registration.kind]} "{registration.name}" ({plugin_label(registration.plugin)})'


def refusal(registration: Registration, exc: Exception) -> str:
    """What a factory's exception means for the recipe, naming who raised it."""
    what = str(exc) if isinstance(exc, NgkitError) else f"{type(exc).__name__}: {exc}"
    return f"{component_label(registration)} could not be built: {what}"


# Every built component, so that an exception inside its code can be traced back to the recipe
# key that built it (ngkit.cli.main). Weak references: nothing is kept alive by being listed.
_BUILT: dict[int, tuple[weakref.ref, str, Registration]] = {}


def _remember(obj: Any, where: str, registration: Registration) -> None:
    try:
        ref = weakref.ref(obj, lambda _, key=id(obj): _BUILT.pop(key, None))
    except TypeError:  # not weak-referenceable (e.g. a plain function): not traceable
        return
    _BUILT[id(obj)] = (ref, where, registration)


def built_at(obj: Any) -> tuple[str, Registration] | None:
    """The recipe key and registration that built ``obj``, if a recipe built it."""
    entry = _BUILT.get(id(obj))
    if entry is None or entry[0]() is not obj:
        return None
    return entry[1], entry[2]


def component_tables(recipe: Recipe) -> list[tuple[str, dict[str, Any], str]]:
    """(kind, table, dotted key) for every component a recipe names."""
    return tables_of(recipe.model_dump())


def tables_of(data: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """:func:`component_tables` of a recipe as plain data, validated or not: tables that are
    missing or not tables are left out (the schema reports them)."""

    def table(*path: str) -> Any:
        node: Any = data
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        return node

    tables = []
    for kind, path in (("datasets", ("data",)), ("encoders", ("model", "encoder")), ("decoders", ("model", "decoder")),
                       ("methods", ("method",)), ("beta_schedules", ("schedule", "beta"))):
        found = table(*path)
        if isinstance(found, dict):
            if kind == "datasets":
                found = dataset_options(found)
            tables.append((kind, found, ".".join(path)))
    metrics, options = table("eval", "metrics"), table("eval", "options")
    metrics = [m for m in metrics if isinstance(m, str)] if isinstance(metrics, list) else []
    options = options if isinstance(options, dict) else {}
    for metric in metrics:
        extra = options.get(metric, {})
        tables.append(("metrics", {"name": metric, **(extra if isinstance(extra, dict) else {})}, f"eval.metrics.{metric}"))
    for metric in sorted(set(options) - set(metrics)):
        if isinstance(options[metric], dict):
            tables.append(("metrics", {"name": metric, **options[metric]}, f"eval.options.{metric}"))
    losses = data.get("loss")
    for i, loss in enumerate(losses if isinstance(losses, list) else []):
        if isinstance(loss, dict):  # [[loss]]: weight and start are the core's (ngkit/losses.py)
            tables.append(("losses", {k: v for k, v in loss.items() if k not in ("weight", "start")}, f"loss.{i}"))
    return tables


def check_recipe_components(data: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    """Problems of every component table of a recipe (as plain data), except tables under the
    dotted keys in ``skip`` (the schema already reported a problem there)."""
    registry = get_registry()
    problems: list[str] = []
    for kind, table, where in tables_of(data):
        if not any(where == key or where.startswith(key + ".") or key == where + ".name" for key in skip):
            problems += check_component(kind, table, where, registry)
    return problems
