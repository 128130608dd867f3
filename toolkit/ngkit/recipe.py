"""Recipes: TOML files that pick every component by name and set every option.

A recipe is parsed with ``tomllib``, validated by the pydantic schema below, and then each
component table (``[data]``, ``[model.encoder]``, ``[model.decoder]``, ``[method]``,
``[schedule.beta]``, metrics) is bound to the signature of the factory its ``name`` selects.
All problems are reported at once, each with the file, the dotted key, what was expected and
what was found.
"""

from __future__ import annotations

import copy
import difflib
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from ngkit.errors import RecipeError
from ngkit.paths import deepspeed_path_problems, name_problem, relative_problem


class Component(BaseModel):
    """A table that names a registered factory; every other key is an option for it."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Section(BaseModel):
    # inf and nan are valid TOML but no setting of ngkit's own means them
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DataSection(Component):
    """``[data]``: the dataset plugin and its options, plus the per-rank batch size."""

    batch_size: int = Field(32, gt=0, description="images per optimiser step on each rank")
    channels: Literal[1, 3] | None = Field(
        None, description="1: grey (luma of RGB), 3: RGB (grey repeated); default: the dataset's own"
    )
    workers: int = Field(0, ge=0, description="DataLoader worker processes per rank")
    max_unreadable: float = Field(
        0.01, ge=0, le=1, description="unreadable training images tolerated, as a fraction of those read"
    )


def dataset_options(data: dict[str, Any]) -> dict[str, Any]:
    """A ``[data]`` table as its dataset plugin sees it: ``name`` and the plugin's own options,
    without the core's keys (batch size, workers, unreadable-image limit)."""
    core = set(DataSection.model_fields) - {"name"}
    return {k: v for k, v in data.items() if k not in core}


class ModelSection(Section):
    codes: int = Field(gt=1, description="vocabulary size V of every token")
    patch_size: PositiveInt | tuple[PositiveInt, PositiveInt] = Field(
        description="pixels per token: p (square) or [height, width]; tokens = (H/ph)*(W/pw)"
    )
    encoder: Component
    decoder: Component

    @property
    def patch(self) -> tuple[int, int]:
        """``patch_size`` as (height, width) in pixels."""
        p = self.patch_size
        return (p, p) if isinstance(p, int) else (p[0], p[1])


class OptimSection(Section):
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate of encoder and decoder")
    encoder_lr: float | None = Field(
        None, gt=0, description="learning rate of the method's encoder parameters instead of lr (schedules scale it alike)"
    )
    decoder_lr: float | None = Field(
        None, gt=0, description="learning rate of the method's decoder parameters instead of lr (schedules scale it alike)"
    )
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    accumulate: int = Field(
        1, gt=0, description="micro-batches per optimiser step; global batch = batch_size x accumulate x ranks"
    )
    clip: Literal["agc", "norm", "none"] = Field(
        "agc", description="adaptive (unit-wise) clipping, global-norm clipping, or none"
    )
    clip_value: float = Field(1.0, gt=0, description="AGC ratio or max global norm")
    max_skipped_steps: int = Field(
        50, gt=0, description="consecutive non-finite steps tolerated before the run stops"
    )
    fused: bool = Field(True, description="AdamW's fused kernel (4x faster on CPU); false: torch's foreach kernel")


class ScheduleSection(Section):
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up")
    lr_decay: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr")
    beta: Component = Field(
        default_factory=lambda: Component(name="constant", value=1.0),
        description="β schedule (weight of KL(q‖uniform prior))",
    )


class RunSection(Section):
    steps: int = Field(gt=0, description="optimiser steps")
    seconds: float | None = Field(
        None, gt=0,
        description="wall-clock budget of this process: end at the first step past it (schedules still span steps; a resumed run gets it afresh)",
    )
    seed: int = 0
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0, description="held-out eval cadence in steps; 0: at the end")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint cadence in steps; 0: by time only")
    checkpoint_minutes: float = Field(
        10.0, ge=0, description="also checkpoint when this many minutes passed since the last save; 0: off"
    )
    keep_checkpoints: int = Field(3, ge=1, description="newest complete checkpoints kept")
    out_dir: str = Field("runs/{recipe}", description="run directory; {recipe} is the file stem")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    grid_images: int = Field(8, ge=1, description="test images in the reconstruction grid")
    ema: float = Field(
        0.0, ge=0, lt=1, description="decay of the encoder/decoder weight average evaluated and exported; 0: off"
    )
    trackers: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description='experiment trackers fed by the trackers plugin: "tensorboard", "wandb"'
    )

    @field_validator("out_dir")
    @classmethod
    def _below_here(cls, value: str) -> str:
        problem = relative_problem(value, "out_dir")
        if problem:
            raise ValueError(problem)
        return value


class DistributedSection(Section):
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on CUDA, else gloo")
    flush_denormal: bool = Field(True, description="CPU: flush denormal floats to zero (faster; docs/performance.md)")
    deepspeed: dict[str, Any] = Field(
        default_factory=dict, description="extra DeepSpeed config keys, merged last"
    )

    @field_validator("deepspeed")
    @classmethod
    def _paths_below_here(cls, value: dict[str, Any]) -> dict[str, Any]:
        problems = deepspeed_path_problems(value)
        if problems:
            raise ValueError("; ".join(problems))
        return value


class EvalSection(Section):
    metrics: list[str] = Field(default_factory=lambda: ["mse", "psnr", "ssim", "usage", "beta-elbo"])
    num_images: int = Field(256, gt=0, description="held-out images evaluated at the end")
    periodic_images: int | None = Field(
        None, gt=0, description="held-out images at each eval_every (default: num_images)"
    )
    batch_size: int = Field(64, gt=0)
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-metric options, e.g. [eval.options.fid]"
    )


class CompareSection(Section):
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="label -> partial recipe merged over this one (a new [method] replaces it whole)",
    )
    seeds: list[int] = Field(default_factory=lambda: [0], description="seeds run for every variant")

    @field_validator("variants")
    @classmethod
    def _plain_labels(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        problems = [p for label in value if (p := name_problem(label, "variant"))]
        if problems:
            raise ValueError("; ".join(problems))
        return value


class LossTable(Component):
    """``[[loss]]``: a registered reconstruction loss, its weight and the step it starts at."""

    weight: float = Field(1.0, ge=0, description="nats of log-likelihood per unit of the loss, per image")
    start: int = Field(0, ge=0, description="first training step the loss applies at")


class Recipe(Section):
    data: DataSection
    model: ModelSection
    method: Component
    optim: OptimSection = Field(default_factory=OptimSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    run: RunSection
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    compare: CompareSection = Field(default_factory=CompareSection)
    loss: list[LossTable] = Field(default_factory=list, description="[[loss]] tables (ngkit/losses.py)")


def _schema_fields(model: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """Field names allowed at ``path`` (for "did you mean")."""
    for part in path:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return []
    return list(model.model_fields)


def format_errors(exc: ValidationError, schema: type[BaseModel]) -> list[str]:
    """One problem line per pydantic error of ``schema`` (any recipe schema), with "did you mean"."""
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            allowed = _schema_fields(schema, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            problems.append(f"[{key}] unknown key{hint} (allowed: {', '.join(allowed)})")
        elif err["type"] == "missing":
            problems.append(f"[{key}] is required but missing")
        elif err["type"] == "value_error" and "error" in err.get("ctx", {}):  # our validators' own words
            problems.append(f"[{key}] {err['ctx']['error']}")
        else:
            found = err.get("input")
            problems.append(f"[{key}] {err['msg']}; found {found!r}")
    return problems


# Deepest nesting of tables and arrays a recipe may have; real recipes use 4 ([compare.variants.x.method]
# with an inline table). Far below the depth at which the TOML parser runs out of stack.
MAX_DEPTH = 16


def _depth(value: Any) -> int:
    """Nesting depth of tables and arrays, walked with a stack: a dotted key 1,200 parts long
    parses into 1,200 nested tables, deeper than Python's recursion limit."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > MAX_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _loads(text: str) -> dict[str, Any]:
    """``tomllib.loads`` that also refuses nesting deeper than :data:`MAX_DEPTH` (a ValueError)."""
    try:
        data = tomllib.loads(text)
    except RecursionError:
        data = None
    if data is None or _depth(data) > MAX_DEPTH:
        raise ValueError(f"tables or arrays nested more than {MAX_DEPTH} levels deep")
    return data


def parse_value(text: str) -> Any:
    """A ``--set`` value as TOML (numbers, booleans, arrays, inline tables), else a string.

    Raises ValueError for values nested too deeply."""
    try:
        return _loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to a raw recipe dict (a copy)."""
    out = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = [p.strip() for p in key.split(".")]
        if not sep or not all(parts):
            problems.append(f"--set {item!r}: expected dotted.key=value, e.g. run.steps=100")
            continue
        try:
            parsed = parse_value(value.strip())
        except ValueError as exc:
            problems.append(f"--set {item!r}: {exc}")
            continue
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"--set {item!r}: [{part}] is not a table")
                break
        else:
            node[parts[-1]] = parsed
    if problems:
        raise RecipeError(source, problems)
    return out


def read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is dropped
    except FileNotFoundError:
        raise RecipeError(str(path), ["file not found; list shipped recipes with 'ngkit recipes list'"]) from None
    except IsADirectoryError:
        raise RecipeError(str(path), ["is a directory; give a recipe file (.toml)"]) from None
    except UnicodeDecodeError as exc:
        raise RecipeError(
            str(path), [f"not UTF-8 text (byte {exc.start}: {exc.reason}); TOML files must be UTF-8"]
        ) from None
    except OSError as exc:
        raise RecipeError(str(path), [f"cannot be read: {exc.strerror or exc}"]) from None
    try:
        return _loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(str(path), [f"not valid TOML: {exc}"]) from exc
    except ValueError as exc:
        raise RecipeError(str(path), [f"not a recipe: {exc}"]) from exc


def parse_recipe(raw: dict[str, Any], source: str) -> Recipe:
    """Validate the schema and every component's options; raise one RecipeError with all problems."""
    from ngkit.binding import check_recipe_components

    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        located = tuple(".".join(str(p) for p in err["loc"]) for err in exc.errors())
        problems = format_errors(exc, Recipe) + check_recipe_components(raw, skip=located)
        raise RecipeError(source, problems) from None
    problems = check_recipe_components(recipe.model_dump())
    from ngkit.export_config import size_problems  # absurd widths/depths, before anything is built

    model = recipe.model_dump()["model"]
    problems += [p.removeprefix("the recipe ") for p in size_problems({f"model.{k}": model[k] for k in ("encoder", "decoder")}, "the recipe")]
    for label, partial in recipe.compare.variants.items():
        try:
            parse_recipe(variant_raw(raw, partial), f"{source} [compare.variants.{label}]")
        except RecipeError as exc:
            problems += [f"[compare.variants.{label}] {p}" for p in exc.problems]
    if problems:
        raise RecipeError(source, problems)
    return recipe


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge; a component table whose ``name`` changes replaces the old one whole, so
    options of the old component never leak into the new one."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        renamed = isinstance(value, dict) and "name" in value and isinstance(old, dict) and old.get("name") != value["name"]
        if isinstance(value, dict) and isinstance(old, dict) and not renamed:
            out[key] = _merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def variant_raw(raw: dict[str, Any], partial: dict[str, Any]) -> dict[str, Any]:
    """A compare variant as a stand-alone raw recipe: ``partial`` merged over ``raw``."""
    return _merge({k: v for k, v in raw.items() if k != "compare"}, partial)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    raw = apply_overrides(read_toml(path), overrides or [], str(path))
    return parse_recipe(raw, str(path))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe (defaults filled) as plain TOML-able data."""
    return recipe.model_dump(mode="json", exclude_none=True)


def _type_name(annotation: Any) -> str:
    import typing

    if typing.get_origin(annotation) is not None or not hasattr(annotation, "__name__"):
        return str(annotation).replace("typing.", "")
    return annotation.__name__


def reference_markdown() -> str:
    """The recipe reference (docs/recipes.md): every section's keys, then every registered
    component's options, generated from the schema and the factories' signatures."""
    from ngkit.binding import factory_params
    from ngkit.components import CONTEXT_ARGS
    from ngkit.plugins import KINDS, get_registry

    lines = [
        "# Recipe reference",
        "",
        "Generated by `ngkit recipes reference` from the schema and the registered plugins; a test",
        "keeps this file in step with the code. A component table (`[data]`, `[model.encoder]`,",
        "`[model.decoder]`, `[method]`, `[schedule.beta]`, `[eval.options.<metric>]`) takes `name` plus",
        "the options of the factory that name selects (listed in the second part).",
        "",
        "## Sections",
    ]
    sections = {
        "data": DataSection, "model": ModelSection, "method": Component, "optim": OptimSection,
        "schedule": ScheduleSection, "run": RunSection, "distributed": DistributedSection,
        "eval": EvalSection, "compare": CompareSection, "[loss]": LossTable,  # an array of tables: [[loss]]
    }
    for name, model in sections.items():
        lines += ["", f"### [{name}]", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, field in model.model_fields.items():
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            if isinstance(field.get_default(call_default_factory=True), BaseModel):
                default = "see table"
            lines.append(f"| `{key}` | `{_type_name(field.annotation)}` | `{default}` | {field.description or ''} |")
    lines += ["", "## Components", "", "Context arguments, filled in by ngkit and never written in a recipe: "
              + ", ".join(f"`{k}` ({v})" for k, v in CONTEXT_ARGS.items()) + "."]
    registry = get_registry()
    for kind in KINDS:
        lines += ["", f"### {kind.replace('_', ' ')} ({kind})"]
        for name in registry.names(kind):
            reg = registry.entries[kind][name]
            params, _ = factory_params(reg.factory)
            opts = [p for p in params.values() if p.name not in CONTEXT_ARGS]
            lines += ["", f"**`{name}`** (plugin `{reg.plugin}`)" + ("" if opts else ": no options")]
            if opts:
                lines += ["", "| option | type | default |", "|---|---|---|"]
                for p in opts:
                    ann = f"{p.ref.kind} name" if p.ref else _type_name(p.annotation)
                    default = "required" if p.required else repr(p.default)
                    lines.append(f"| `{p.name}` | `{ann}` | `{default}` |")
    return "\n".join(lines) + "\n"
