"""Side-by-side comparison: the same recipe trained once per method variant and seed, with
the same data, decoder, bits per image, budget and held-out images; then one table and one
figure for all of them.

A budget in seconds (``--seconds S``) gives every variant S seconds of wall clock: each run ends
at its first step past S (``[run] seconds``). Step-indexed schedules (β, temperature, learning
rate) are laid out over the steps a short calibration run predicts for S, with
:data:`SECONDS_HEADROOM` to spare so that no run ends on steps before its time is up; a run
stopped by the clock has gone through about 1 / SECONDS_HEADROOM of its schedules or more. Every
row of the table gives the steps each run reached and its seconds, in either mode.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ngkit.engine.artifacts import read_jsonl
from ngkit.engine.progress import collapse_reason
from ngkit.errors import NgkitError
from ngkit.plugins import get_registry
from ngkit.paths import name_problem
from ngkit.recipe import Recipe, apply_overrides, parse_recipe, variant_raw

console = Console(stderr=True)

# Steps laid out per run under --seconds, as a multiple of the calibrated prediction: a run that
# ran out of steps before its seconds would not be an equal-wall-clock run (compare warns if one does).
SECONDS_HEADROOM = 1.25
# The two calibration runs' steps: their difference times one step, without start-up costs.
CALIBRATION_STEPS = (5, 25)

# Columns of the table: (result key, header, format); lower-is-better marked in the header.
COLUMNS = [
    ("psnr", "PSNR dB ↑", ".2f"),
    ("ssim", "SSIM ↑", ".3f"),
    ("mse", "MSE ↓", ".5f"),
    ("fid", "rFID ↓", ".2f"),
    ("beta_elbo", "β-ELBO nats ↑", ".1f"),
    ("code_usage", "code usage ↑", ".1%"),
    ("code_perplexity", "perplexity ↑", ".1f"),
    ("eta", "final η", ".3g"),
    ("ess", "final ESS/K", ".2f"),
    ("bits_per_image", "bits/image", ".0f"),
    ("step", "steps reached", ".0f"),
    ("train_seconds", "train s", ".0f"),
    ("images_per_s", "images/s", ".1f"),
]


@dataclass
class Variant:
    label: str
    raw: dict[str, Any]


def variants(raw: dict[str, Any], recipe: Recipe, labels: list[str] | None, source: str) -> list[Variant]:
    """The recipe's ``[compare.variants]`` (or the requested labels; a bare registered method
    name is a variant with that method's defaults)."""
    table = recipe.compare.variants
    chosen = labels or list(table)
    if not chosen:
        raise NgkitError(f"{source}: no [compare.variants] and no --methods given; nothing to compare")
    methods = set(get_registry().names("methods"))
    out = []
    for label in chosen:
        problem = name_problem(label, f"{source}: variant")  # it names a run directory under --out
        if problem:
            raise NgkitError(problem)
        if label in table:
            out.append(Variant(label, variant_raw(raw, table[label])))
        elif label in methods:
            out.append(Variant(label, variant_raw(raw, {"method": {"name": label}})))
        else:
            raise NgkitError(
                f"--methods: {label!r} is neither a variant of {source} ({', '.join(table) or 'none'}) "
                f"nor a registered method ({', '.join(sorted(methods))})"
            )
    return out


def _flatten(summary: dict[str, Any]) -> dict[str, Any]:
    row = dict(summary["metrics"])
    for key in ("step", "train_seconds", "stopped_by", "bits_per_image", "parameters", "images_per_s", "eta", "ess", "entropy", "codes"):
        row[key] = summary.get(key)
    return row


def _calibrate(variant: Variant, source: str, out: Path) -> float:
    """Seconds per training step of a variant: the difference of two short runs without
    evaluation (CALIBRATION_STEPS), divided by their difference in steps, so the start-up and
    first steps' one-off costs (allocation, warm-up: seconds, where a small model's step takes
    tens of milliseconds) cancel instead of being spread over the steps."""
    from ngkit.engine.train_loop import train

    seconds = []
    for steps in CALIBRATION_STEPS:
        raw = apply_overrides(
            variant.raw,
            [f"run.steps={steps}", "run.eval_every=0", "run.checkpoint_every=0", "eval.num_images=8",
             'eval.metrics=["mse"]'],
            source,
        )
        seconds.append(train(parse_recipe(raw, source), out / f"steps-{steps}", quiet=True).summary["train_seconds"])
    short, long = CALIBRATION_STEPS
    per_step = (seconds[1] - seconds[0]) / (long - short)
    return per_step if per_step > 0 else seconds[1] / long  # timing noise above the signal: the mean


def run_compare(
    source: Path,
    raw: dict[str, Any],
    recipe: Recipe,
    out: Path,
    *,
    labels: list[str] | None,
    steps: int | None,
    seconds: float | None,
    seeds: list[int] | None,
) -> dict[str, Any]:
    from ngkit.engine.train_loop import train

    chosen = variants(raw, recipe, labels, str(source))
    seeds = seeds or recipe.compare.seeds
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    budgets: dict[str, int] = {}
    for variant in chosen:
        if seconds is not None:
            per_step = _calibrate(variant, str(source), out / "calibration" / variant.label)
            budgets[variant.label] = max(1, math.ceil(SECONDS_HEADROOM * seconds / per_step))
            console.print(f"[bold]{variant.label}[/]: {per_step:.3f} s/step -> schedules over "
                          f"{budgets[variant.label]} steps, stopped at {seconds:g} s")
        elif steps is not None:
            budgets[variant.label] = steps
        for seed in seeds:
            overrides = [f"run.seed={seed}"]
            if variant.label in budgets:
                overrides.append(f"run.steps={budgets[variant.label]}")
            if seconds is not None:
                overrides.append(f"run.seconds={seconds}")
            run_raw = apply_overrides(variant.raw, overrides, str(source))
            parsed = parse_recipe(run_raw, f"{source} [{variant.label}]")
            run_dir = out / f"{variant.label}-seed{seed}"
            console.print(f"[bold]{variant.label}[/] seed {seed}: {parsed.run.steps} steps -> {run_dir}")
            t0 = time.perf_counter()
            result = train(parsed, run_dir, quiet=False)
            records = read_jsonl(run_dir / "metrics.jsonl")
            train_records = [r for r in records if r.get("kind") == "train"]
            ips = [r["images_per_s"] for r in train_records if "images_per_s" in r]
            summary = dict(result.summary)
            summary["images_per_s"] = statistics.median(ips) if ips else None
            for key in ("eta", "ess", "entropy"):  # where the method has them, at the end
                last = [r[key] for r in train_records if key in r]
                summary[key] = last[-1] if last else None
            row = {"variant": variant.label, "method": parsed.method.name, "seed": seed, "run_dir": str(run_dir),
                   "wall_seconds": time.perf_counter() - t0, **_flatten(summary)}
            row["collapse"] = collapse_reason(row, row.get("codes"))
            if seconds is not None and row["stopped_by"] == "steps" and row["train_seconds"] < seconds:
                console.print(
                    f"[yellow]warning:[/] {variant.label} seed {seed} ran out of its {row['step']} steps at "
                    f"{row['train_seconds']:.1f} s < {seconds:g} s: not an equal-wall-clock run (the "
                    "calibration overestimated a step); rerun with a longer --seconds"
                )
            rows.append(row)
    table = aggregate(rows)
    write_outputs(out, rows, table, seeds, steps, seconds, budgets)
    return {"rows": rows, "table": table}


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds, per variant."""
    table = []
    for label in dict.fromkeys(r["variant"] for r in rows):
        group = [r for r in rows if r["variant"] == label]
        entry: dict[str, Any] = {"variant": label, "method": group[0]["method"], "seeds": len(group)}
        for key, _, _ in COLUMNS:
            values = [r[key] for r in group if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if values:
                entry[key] = statistics.fmean(values)
                entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        collapsed = [r["collapse"] for r in group if r.get("collapse")]
        entry["collapse"] = f"{len(collapsed)}/{len(group)} seeds" if collapsed else "no"
        table.append(entry)
    return table


def _cell(entry: dict[str, Any], key: str, fmt: str) -> str:
    if key not in entry:
        return "–"
    text = format(entry[key], fmt)
    if entry.get("seeds", 1) > 1 and key not in ("bits_per_image",):
        text += f" ± {format(entry[f'{key}_std'], fmt)}"
    return text


def markdown(table: list[dict[str, Any]]) -> str:
    """The results table; the last column flags runs whose codes collapsed (``collapse_reason``)."""
    cols = [c for c in COLUMNS if any(c[0] in e for e in table)]
    lines = ["| variant | method | " + " | ".join(h for _, h, _ in cols) + " | collapse |"]
    lines.append("|---|---|" + "---|" * (len(cols) + 1))
    for e in table:
        cells = [_cell(e, k, f) for k, _, f in cols] + [e.get("collapse", "–")]
        lines.append(f"| {e['variant']} | {e['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(
    out: Path, rows: list[dict[str, Any]], table: list[dict[str, Any]], seeds: list[int],
    steps: int | None, seconds: float | None, budgets: dict[str, int],
) -> None:
    budget = (f"{seconds:g} s of training per run (each stops at its first step past it)" if seconds
              else f"{steps} steps" if steps else "recipe steps")
    header = f"Budget: {budget}; seeds {seeds}; mean ± std over seeds.\n\n"
    (out / "results.md").write_text(header + markdown(table))
    (out / "results.json").write_text(
        json.dumps({"budget": budget, "steps": budgets, "seeds": seeds, "table": table, "runs": rows}, indent=2) + "\n"
    )
    keys = sorted({k for r in rows for k in r})
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    save_figure(out / "curves.png", rows)
    save_reconstructions(out / "reconstructions.png", rows)
    show(table)


def save_figure(path: Path, rows: list[dict[str, Any]]) -> None:
    """Held-out PSNR against steps and against training seconds, and the decoder loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = {}
    for row in rows:
        records = read_jsonl(Path(row["run_dir"]) / "metrics.jsonl")
        color = colors.setdefault(row["variant"], f"C{len(colors) % 10}")
        label = row["variant"] if row["seed"] == min(r["seed"] for r in rows if r["variant"] == row["variant"]) else None
        evals = [r for r in records if r.get("kind") == "eval" and "test/psnr" in r]
        train = [r for r in records if r.get("kind") == "train"]
        per_step = row["train_seconds"] / max(1, row["step"])
        axes[0].plot([r["step"] for r in evals], [r["test/psnr"] for r in evals], "o-", color=color, label=label, ms=3)
        axes[1].plot([r["step"] * per_step for r in evals], [r["test/psnr"] for r in evals], "o-", color=color, label=label, ms=3)
        key = "gen_loss" if any("gen_loss" in r for r in train) else "loss"
        axes[2].plot([r["step"] for r in train if key in r], [r[key] for r in train if key in r], color=color, label=label, lw=1)
    axes[0].set(xlabel="step", ylabel="held-out PSNR (dB)", title="PSNR vs steps")
    axes[1].set(xlabel="training seconds", ylabel="held-out PSNR (dB)", title="PSNR vs wall clock")
    axes[2].set(xlabel="step", ylabel="-log p(x|z) (nats)", title="decoder loss", yscale="symlog")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_reconstructions(path: Path, rows: list[dict[str, Any]]) -> None:
    """Originals on top, then one row per variant (its first seed)."""
    import numpy as np
    from PIL import Image

    firsts: dict[str, dict[str, Any]] = {}
    for row in rows:
        firsts.setdefault(row["variant"], row)
    grids = [Path(r["run_dir"]) / "reconstructions.png" for r in firsts.values()]
    if not grids or not all(g.exists() for g in grids):
        return
    halves = [np.asarray(Image.open(g).convert("RGB")) for g in grids]
    half = halves[0].shape[0] // 2  # each run's grid: originals above reconstructions
    stacked = [halves[0][:half]] + [h[half : 2 * half] for h in halves]
    Image.fromarray(np.concatenate(stacked, 0)).save(path)


def show(table: list[dict[str, Any]]) -> None:
    cols = [c for c in COLUMNS if any(c[0] in e for e in table)]
    t = Table(title="ngkit compare")
    t.add_column("variant")
    for _, header, _ in cols:
        t.add_column(header, justify="right")
    t.add_column("collapse")
    for e in table:
        t.add_row(e["variant"], *[_cell(e, k, f) for k, _, f in cols], e.get("collapse", "–"))
    Console().print(t)
