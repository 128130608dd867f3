"""Checking an export's ``config.json`` before anything is built from it.

A config that travels may be damaged or crafted: every field ``ngkit.load`` reads is checked for
its type and range first, unknown top-level keys are refused (a typo or a newer format), and the
model's size is estimated from its components' widths and depths, so that a config asking for a
million layers is refused in milliseconds instead of building for minutes.
"""

from __future__ import annotations

from typing import Any

from ngkit.errors import WeightsError

# Top-level keys ngkit.export writes (docs/tokenizer.md), and their types.
FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str, "format_version": int, "ngkit_version": str, "method": str, "components": dict,
    "sources": dict, "image": dict, "latent": dict, "sample": bool, "dtype": str, "not_exported": list,
    "total_steps": int, "step": int, "checkpoint": str, "trained": dict, "files": dict,
    "weights": str,  # "ema" or "raw" (ngkit.engine.ema)
}
REQUIRED = ("format", "format_version", "method", "components", "sources", "image", "latent", "dtype",
            "not_exported", "total_steps", "step")
MAX_SIDE = 1 << 14  # pixels per image side
MAX_LAYERS = 4096  # more than any tokenizer uses; building more modules takes minutes
MAX_WIDTH = 1 << 16
MAX_PARAMETERS = 20_000_000_000  # 80 GB of float32 weights


def _ints(table: Any, prefix: str = "") -> list[tuple[str, int]]:
    """Every integer value in a (nested) component table, with its dotted key."""
    out: list[tuple[str, int]] = []
    if isinstance(table, dict):
        for key, value in table.items():
            where = f"{prefix}{key}"
            if isinstance(value, bool):
                continue
            if isinstance(value, int):
                out.append((where, value))
            elif isinstance(value, (dict, list)):
                out += _ints(value, where + ".")
    elif isinstance(table, list):
        for i, value in enumerate(table):
            out += _ints(value, f"{prefix}{i}.")
    return out


def size_problems(tables: dict[str, Any], where: str) -> list[str]:
    """Widths, depths and an estimate of the parameters (12 x depth x width^2 per transformer-like
    part, the count of a standard block) that no machine could hold."""
    problems, total = [], 0
    for name, table in tables.items():
        widths = [(k, v) for k, v in _ints(table) if k.rsplit(".", 1)[-1] in ("width", "dim", "embed_dim", "hidden")]
        depths = [(k, v) for k, v in _ints(table) if "depth" in k.rsplit(".", 1)[-1] or k.endswith("layers")]
        for key, value in depths:
            if value > MAX_LAYERS:
                problems.append(f"{where} [{name}] {key} = {value} is more than {MAX_LAYERS} layers")
        for key, value in widths:
            if value > MAX_WIDTH:
                problems.append(f"{where} [{name}] {key} = {value} is wider than {MAX_WIDTH}")
        width = max((v for _, v in widths), default=0)
        depth = max(1, sum(max(0, v) for _, v in depths))
        total += 12 * depth * width * width
    if total > MAX_PARAMETERS:
        problems.append(
            f"{where}: the model would have about {total:.3g} parameters ({4 * total / 1e9:.3g} GB of float32 "
            f"weights), more than the {MAX_PARAMETERS:.0e} ngkit accepts"
        )
    return problems


def check_config(config: Any, source: str) -> None:
    """Raise one :class:`WeightsError` listing every problem of an export config."""
    from ngkit.export import DTYPES

    if not isinstance(config, dict):
        raise WeightsError(f"{source}: an export config is a JSON object, found {type(config).__name__}")
    problems = [f"missing key {key!r}" for key in REQUIRED if key not in config]
    problems += [f"unknown top-level key {key!r} (a newer ngkit's format, or a typo)" for key in config if key not in FIELDS]
    for key, kind in FIELDS.items():
        if key in config and (not isinstance(config[key], kind) or (kind is int and isinstance(config[key], bool))):
            problems.append(f"{key!r} must be {getattr(kind, '__name__', kind)}, found {type(config[key]).__name__}")
    if problems:
        raise WeightsError(f"{source} is not a valid export config: " + "; ".join(problems))
    if config["dtype"] not in DTYPES:
        problems.append(f"'dtype' is {config['dtype']!r}; one of {', '.join(DTYPES)}")
    image, latent = config["image"], config["latent"]
    for key in ("channels", "height", "width"):
        value = image.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SIDE:
            problems.append(f"image.{key} must be an integer in 1..{MAX_SIDE}, found {value!r}")
    channels = image.get("channels") if isinstance(image.get("channels"), int) else None
    for key in ("mean", "std"):
        value = image.get(key)
        if not (isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                and (channels is None or len(value) == channels)):
            problems.append(f"image.{key} must be a list of {channels or 'C'} numbers, found {value!r}")
    grid, codes = latent.get("grid"), latent.get("codes")
    if not (isinstance(grid, list) and grid and all(isinstance(g, int) and not isinstance(g, bool) and 1 <= g <= MAX_SIDE for g in grid)):
        problems.append(f"latent.grid must be a list of positive integers, found {grid!r}")
    if not isinstance(codes, int) or isinstance(codes, bool) or not 2 <= codes <= 1 << 24:
        problems.append(f"latent.codes must be an integer in 2..{1 << 24}, found {codes!r}")
    if not all(isinstance(v, str) for v in config["not_exported"]):
        problems.append("'not_exported' must be a list of strings")
    for where, info in config["sources"].items():
        if not (isinstance(info, dict) and all(isinstance(info.get(k), str) for k in ("kind", "name", "plugin", "package", "version"))):
            problems.append(f"sources.{where} must hold the strings kind, name, plugin, package, version")
    for where, table in config["components"].items():
        if not (isinstance(table, dict) and isinstance(table.get("name"), str)):
            problems.append(f"components.{where} must be a table with a string 'name'")
    if not all(isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in config.get("files", {}).items()):
        problems.append("'files' must map file names to SHA-256 hex digests")
    problems += size_problems(config["components"], "components")
    if problems:
        raise WeightsError(f"{source} is not a valid export config: " + "; ".join(problems))
