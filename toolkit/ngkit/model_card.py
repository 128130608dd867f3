"""The ``README.md`` model card ``ngkit export`` writes next to the weights.

YAML front matter as the Hugging Face Hub reads it (``library_name``, ``tags``, ``pipeline_tag``
and ngkit's own ``ngkit:`` block), then what the tokenizer is (method, data, code size in bits),
its held-out metrics with the protocol behind each number, and how to load it. The metrics are
the run's ``summary.json`` ones, shown only when they were computed on the exported step and
weights (training evaluates the ``[run] ema`` average when there is one).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import tomli_w

CARD = "README.md"


def _yaml(value: Any, indent: int = 0) -> list[str]:
    """A small YAML writer for the card's front matter: dicts, lists of scalars, JSON scalars
    (a JSON string is a valid YAML scalar, so no value needs escaping rules of its own)."""
    pad, lines = " " * indent, []
    for key, item in value.items():
        if isinstance(item, dict):
            lines += [f"{pad}{key}:", *_yaml(item, indent + 2)]
        elif isinstance(item, list):
            lines += [f"{pad}{key}:", *(f"{pad}- {json.dumps(x)}" for x in item)]
        else:
            lines.append(f"{pad}{key}: {json.dumps(item)}")
    return lines


def evaluated_weights(recipe: dict[str, Any]) -> str:
    """Which weights training evaluated: the average when ``[run] ema`` was on."""
    return "ema" if recipe.get("run", {}).get("ema", 0) else "raw"


def matching_summary(config: dict[str, Any], run_dir: Path) -> dict[str, Any] | None:
    """The run's summary.json if its metrics describe the exported step and weights."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    recipe_path = run_dir / "recipe.toml"
    import tomllib

    recipe = tomllib.loads(recipe_path.read_text()) if recipe_path.is_file() else {}
    if summary.get("step") != config["step"] or evaluated_weights(recipe) != config.get("weights", "raw"):
        return None
    return summary


def _format(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def model_card(config: dict[str, Any], summary: dict[str, Any] | None, repo_id: str | None = None) -> str:
    """The card's text for an export's ``config`` (and the run's matching summary, if any)."""
    latent, image = config["latent"], config["image"]
    bits = latent["tokens"] * math.log2(latent["codes"])
    dataset = config["trained"]["dataset"]
    front = {
        "library_name": "ngkit",
        "pipeline_tag": "image-feature-extraction",
        "tags": ["ngkit", "image-tokenizer", "discrete-autoencoder", config["method"]],
        "ngkit": {
            "format": config["format"], "format_version": config["format_version"], "method": config["method"],
            "dataset": dataset, "image_size": [image["channels"], image["height"], image["width"]],
            "tokens": latent["tokens"], "codes": latent["codes"], "bits_per_image": bits,
            "step": config["step"], "weights": config.get("weights", "raw"), "dtype": config["dtype"],
        },
    }
    where = repo_id or "path/to/this/folder"
    grid = "x".join(map(str, latent["grid"]))
    lines = ["---", *_yaml(front), "---", "", f"# {config['method']} image tokenizer ({grid} tokens x {latent['codes']} codes)", ""]
    lines += [
        f"A discrete image tokenizer trained with ngkit {config['ngkit_version']}: "
        f"{image['channels']}x{image['height']}x{image['width']} images with pixels in [0, 1] <-> "
        f"{latent['tokens']} tokens ({grid} grid, row-major) of {latent['codes']} codes, "
        f"{bits:g} bits per image.",
        "",
        "| | |", "|---|---|",
        f"| method | `{config['method']}` |",
        f"| data | `{dataset}` (ngkit dataset plugin) |",
        f"| code | {grid} tokens x {latent['codes']} codes = {bits:g} bits per image |",
        f"| training | {config['step']} of {config['total_steps']} steps, {config['trained']['precision']}, "
        f"ZeRO stage {config['trained']['zero_stage']} |",
        f"| weights | {'exponential moving average ([run] ema)' if config.get('weights') == 'ema' else 'raw (last optimiser step)'}, "
        f"stored as {config['dtype']} |",
        "",
        "## Held-out metrics",
        "",
    ]
    if summary and summary.get("metrics"):
        lines += [f"On {summary.get('eval_images', '?')} held-out images of `{dataset}` at step {summary['step']}:", "",
                  "| metric | value | protocol |", "|---|---|---|"]
        protocols = summary.get("protocol", {})
        for key, value in summary["metrics"].items():
            protocol = next((p for name, p in protocols.items() if key == name or key.startswith(f"{name}/")), {})
            how = protocol.get("definition") or "; ".join(f"{k}: {v}" for k, v in protocol.items() if k != "versions")
            lines.append(f"| {key} | {_format(float(value))} | {how} |")
    else:
        lines.append(f"No held-out metrics were recorded for step {config['step']} with these weights; "
                     f"`ngkit eval RUN` computes them.")
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "import ngkit  # pip install ngkit",
        f'tok = ngkit.load("{where}")  # a Hugging Face Hub id or this folder',
        "codes = tok.encode(images)      # [B, C, H, W] floats in [0, 1] -> LongTensor [B, L]",
        "recon = tok.decode(codes)       # -> [B, C, H, W] in [0, 1]",
        "```",
        "",
        "Only `config.json` and `model.safetensors` are read (no pickles). The components:",
        "",
        "```toml",
        tomli_w.dumps(config["components"]).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
