"""``ngkit export``: a trained checkpoint -> a folder anyone can load, ``config.json`` +
``model.safetensors`` (the format is documented in docs/tokenizer.md).

Only what encoding and decoding read is exported: the method's parts that ``encode``/``decode``
touch (encoder, decoder, quantizer...), not the optimizer, the step size η or other training
state. The same checkpoint always gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ngkit import __version__
from ngkit.binding import factory_params
from ngkit.components import ImageSpec, LatentSpec, Method
from ngkit.engine.build import MODEL_TABLES, build_dataset, build_method, latent_for, model_tables
from ngkit.engine.load import locate, read_model_state
from ngkit.errors import NgkitError, WeightsError
from ngkit.export_files import staged_dir
from ngkit.model_card import CARD
from ngkit.plugins import get_plugin_manager
from ngkit.recipe import load_recipe

FORMAT = "ngkit-tokenizer"
FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
SPECS = "specs.json"  # written into each run by the training loop
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KINDS = {**MODEL_TABLES, "method": "methods"}  # recipe key -> registry kind


@dataclass
class Snapshot:
    """An export in memory: the config, the tensors ``encode``/``decode`` need, the model card."""

    config: dict[str, Any]
    state: dict[str, Tensor]
    card: str = ""  # README.md (ngkit/model_card.py)


def run_specs(run_dir: Path, codes: int, patch_size: int | tuple[int, int]) -> tuple[ImageSpec, LatentSpec]:
    """The image and latent spec of a run, from its specs.json (no dataset needed)."""
    path = run_dir / SPECS
    if not path.is_file():  # a run trained before specs.json was written: ask its dataset
        image = build_dataset(load_recipe(run_dir / "recipe.toml")).spec
        return image, latent_for(image, codes, patch_size)
    try:
        raw = json.loads(path.read_text())
        image = dict(raw["image"])
        image["mean"], image["std"] = tuple(image["mean"]), tuple(image["std"])
        return ImageSpec(**image), LatentSpec(tuple(raw["latent"]["grid"]), int(raw["latent"]["codes"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WeightsError(
            f"{path} is damaged ({type(exc).__name__}: {str(exc)[:200]}); it should hold the run's image and latent "
            f"spec as ngkit run wrote it"
        ) from exc


def image_config(image: ImageSpec) -> dict[str, Any]:
    return {
        "channels": image.channels, "height": image.height, "width": image.width,
        "mean": list(image.mean), "std": list(image.std), "pixel_range": [0.0, 1.0],
    }


def component_sources(tables: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Recipe key -> the plugin and package that provide each component and sub-component."""
    pm = get_plugin_manager()
    registry = pm.registry
    sources: dict[str, dict[str, str]] = {}

    def visit(kind: str, table: dict[str, Any], where: str) -> None:
        found = registry.get(kind, table["name"], where)
        info = pm.info.get(found.plugin)
        sources[where] = {
            "kind": kind, "name": found.name, "plugin": found.plugin,
            "package": info.package if info else "unknown", "version": info.version if info else "unknown",
        }
        for param in factory_params(found.factory)[0].values():
            value = table.get(param.name, param.default)
            sub = {"name": value} if isinstance(value, str) else value
            if param.ref is not None and isinstance(sub, dict) and isinstance(sub.get("name"), str):
                visit(param.ref.kind, sub, f"{where}.{param.name}")

    for where, table in tables.items():
        visit(KINDS[where], table, where)
    return sources


def can_sample(method: Method) -> bool:
    """Whether codes can be drawn from q(z|x): the method's declared ``can_sample``."""
    return bool(getattr(method, "can_sample", False))


class _TensorReads(TorchFunctionMode):
    """Records every tensor passed to a torch function (to find the weights a call reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        self._note((args, kwargs))
        return func(*args, **kwargs)

    def _note(self, value: Any) -> None:
        if isinstance(value, Tensor):
            self.ids.add(id(value))
        elif isinstance(value, (list, tuple)):
            for item in value:
                self._note(item)
        elif isinstance(value, dict):
            for item in value.values():
                self._note(item)


def inference_parts(method: Method, image: ImageSpec) -> set[str]:
    """The method's top-level parts (submodule or tensor names) whose tensors encoding and
    decoding read, found by running both on two random images."""
    tensors = method.state_dict(keep_vars=True)
    reads = _TensorReads()
    was_training = method.training
    method.eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        x = torch.rand(2, *image.shape, generator=torch.Generator().manual_seed(0))
        with reads:
            method.decode(method.encode(x))
            if can_sample(method):
                method.sample_codes(x)  # type: ignore[attr-defined]
    method.train(was_training)
    return {key.split(".")[0] for key, tensor in tensors.items() if id(tensor) in reads.ids}


def snapshot(
    target: Path, *, step: int | None = None, dtype: str = "float32", weights: str | None = None
) -> Snapshot:
    """Read a run's checkpoint (latest, or ``step``) into an export, without DeepSpeed for ZeRO 0-2.
    ``weights``: "ema" (the weight average of ``[run] ema``), "raw", or None: "ema" where the run kept one."""
    if dtype not in DTYPES:
        raise NgkitError(f"unknown export dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    run_dir, tag = locate(target, step)
    recipe = load_recipe(run_dir / "recipe.toml")
    image, latent = run_specs(run_dir, recipe.model.codes, recipe.model.patch_size)
    tables = model_tables(recipe)
    sources = component_sources(tables)
    with torch.random.fork_rng(devices=[]):  # building draws initial weights; leave the caller's RNG be
        _, method = build_method(tables, image, latent, recipe.run.steps)
    module, client = read_model_state(run_dir, tag)
    expected = set(method.state_dict())
    if set(module) != expected:
        missing, unexpected = sorted(expected - set(module)), sorted(set(module) - expected)
        raise WeightsError(
            f"{run_dir / 'checkpoints' / tag} does not fit the method its recipe builds (missing: "
            f"{', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'}); "
            f"was it trained with other versions of the plugins in {run_dir / 'recipe.toml'}?"
        )
    module, weights = choose_weights(module, client, weights, run_dir / "checkpoints" / tag)
    parts = inference_parts(method, image)
    state = {
        key: (value.to(DTYPES[dtype]) if value.is_floating_point() else value).detach().clone().contiguous()
        for key, value in sorted(module.items())
        if key.split(".")[0] in parts
    }
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ngkit_version": __version__,
        "method": tables["method"]["name"],
        "components": tables,
        "sources": sources,
        "image": image_config(image),
        "latent": {"grid": list(latent.grid), "codes": latent.codes, "tokens": latent.tokens,
                   "patch_size": recipe.model.patch_size},
        "sample": can_sample(method),
        "dtype": dtype,
        "weights": weights,
        "not_exported": sorted({key.split(".")[0] for key in module} - parts),
        "total_steps": recipe.run.steps,
        "step": int(client.get("step", int(tag.split("-")[-1]))),
        "checkpoint": tag,
        "trained": {"dataset": recipe.data.name, "precision": recipe.distributed.precision,
                    "zero_stage": recipe.distributed.zero_stage, "ngkit_version": client.get("ngkit_version")},
    }
    return Snapshot(config, state, card_for(config, run_dir))


def choose_weights(
    module: dict[str, Tensor], client: dict[str, Any], weights: str | None, where: Path
) -> tuple[dict[str, Tensor], str]:
    """The raw weights or their average (``[run] ema``, engine/ema.py), and which it is."""
    from ngkit.engine.ema import STATE_KEY, apply_to_state

    average = client.get(STATE_KEY)
    weights = weights or ("ema" if average is not None else "raw")
    if weights not in ("ema", "raw"):
        raise NgkitError(f'unknown --weights {weights!r}; choose "ema" (the weight average) or "raw"')
    if weights == "raw":
        return module, weights
    if average is None:
        raise NgkitError(
            f"--weights ema: {where} holds no weight average (the run trained with [run] ema = 0); "
            f"export --weights raw, or train with [run] ema = 0.999"
        )
    return apply_to_state(module, average["shadow"]), weights


def write_export(snap: Snapshot, out: Path) -> None:
    """Write ``out`` as a whole: the files go into a sibling temporary folder, which then takes
    ``out``'s place in one rename (:func:`ngkit.export_files.replace_dir`), so a killed export leaves
    the old folder or the new one. ``config.json`` also records each file's SHA-256, which
    ``ngkit.load`` checks."""
    from safetensors.torch import save

    # One metadata key: safetensors keeps metadata in a Rust HashMap, whose order (so the bytes)
    # changes from process to process with two or more keys. The format is named in config.json.
    data = save(snap.state, metadata={"format": "pt"})
    config = {**snap.config, "files": {WEIGHTS: hashlib.sha256(data).hexdigest()}}
    with staged_dir(out) as tmp:
        (tmp / WEIGHTS).write_bytes(data)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if snap.card:
            (tmp / CARD).write_text(snap.card)


def export(
    target: Path, out: Path, *, step: int | None = None, dtype: str = "float32", weights: str | None = None
) -> Snapshot:
    """Export a run or checkpoint into ``out``; returns what was written."""
    snap = snapshot(target, step=step, dtype=dtype, weights=weights)
    write_export(snap, out)
    return snap


def card_for(config: dict[str, Any], run_dir: Path, repo_id: str | None = None) -> str:
    """The model card of an export of ``run_dir``; its load example names ``repo_id`` if given."""
    from ngkit.model_card import matching_summary, model_card

    return model_card(config, matching_summary(config, run_dir), repo_id)
