"""``ngkit bench``: time a recipe's training step by phase, against its floor and VQ-VAE."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.table import Table

from ngkit.errors import NgkitError
from ngkit.recipe import apply_overrides, parse_recipe, read_toml, variant_raw

if TYPE_CHECKING:
    from ngkit.engine.bench import BenchReport

BASELINE = "vqvae"


def bench_command(
    recipe: Path = typer.Argument(..., help="Recipe TOML file (e.g. recipes/quickstart.toml)."),
    method: Optional[str] = typer.Option(None, "--method", help="Time this method instead of the recipe's (its [method] table is replaced)."),
    steps: int = typer.Option(20, "--steps", min=1, help="Timed steps, after the warm-up."),
    warmup: int = typer.Option(3, "--warmup", min=0, help="Untimed steps first (allocators, kernels)."),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help=f"Also time {BASELINE} on the same encoder and decoder."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's choice)."),
    clock: str = typer.Option("wall", "--clock", help="wall, or cpu: this process's CPU time (on a shared CPU; with 1 thread)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: dotted.key=value (repeatable)."),
) -> None:
    """Per-phase time of the engine's own training step, images/s, peak memory, step / floor and
    the ratio to VQ-VAE on the same model, measured in this process."""
    if clock not in ("wall", "cpu"):
        raise NgkitError(f"--clock {clock}: expected wall or cpu")
    raw = apply_overrides(read_toml(recipe), set_, str(recipe))
    if method is not None:
        raw = variant_raw(raw, {"method": {"name": method}})
    parsed = parse_recipe(raw, str(recipe))
    base = None
    if baseline and parsed.method.name != BASELINE:
        base = parse_recipe(variant_raw(raw, {"method": {"name": BASELINE}}), f"{recipe} (--method {BASELINE})")
    if threads:
        import torch

        torch.set_num_threads(threads)
    from ngkit.engine.bench import bench

    report = bench(parsed, str(recipe), steps, warmup, base, clock)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    show(report)


def show(report: BenchReport) -> None:
    console = Console()
    t = report.timing
    k = f", K = {t.samples}" if t.samples else ""
    console.print(f"[bold]{report.recipe}[/]: {t.method}, batch {report.batch}{k}, {report.device}, "
                  f"median of {report.steps} steps after {report.warmup} warm-up, {report.clock} clock")
    table = Table(title=f"{t.method}: where a step goes")
    table.add_column("phase")
    table.add_column("ms", justify="right")
    table.add_column("share", justify="right")
    for name, ms in t.phases_ms.items():
        table.add_row(name, f"{ms:.1f}", f"{ms / t.step_ms:.0%}")
    table.add_row("[bold]step[/]", f"[bold]{t.step_ms:.1f}[/]", "")
    console.print(table)
    console.print(f"images/s: {t.images_per_s:.1f}" + (" (per CPU second)" if report.clock == "cpu" else ""))
    if t.floor_ms:
        parts = ", ".join(f"{n} {ms:.1f}" for n, ms in t.floor_parts_ms.items())
        console.print(f"floor: {t.floor_ms:.1f} ms ({parts}); step / floor: {t.step_over_floor:.2f}")
    if report.baseline:
        b = report.baseline
        console.print(f"{b.method} on the same model: {b.step_ms:.1f} ms/step, {b.images_per_s:.1f} images/s; "
                      f"{t.method} / {b.method}: {report.ratio_to_baseline:.2f}")
    cuda = f", CUDA max allocated {report.cuda_max_allocated_mb:.0f} MiB" if report.cuda_max_allocated_mb else ""
    console.print(f"peak memory: RSS {report.peak_rss_mb:.0f} MiB{cuda}")
