"""Live training display (rich): a progress bar with loss, η, ESS and held-out PSNR, then a
final table; a warning when the codes collapse. Only rank 0 shows it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# Logs and CI capture stderr without a terminal; 80 columns would truncate the live numbers.
console = Console(stderr=True, width=None if Console(stderr=True).is_terminal else 140)

SHOWN = ("loss", "eta", "ess", "beta")

# Code collapse: the encoder has settled on a handful of codes. Per-token entropy below 0.1 nats
# means the K samples of an image almost always coincide (DAPS's update then vanishes); a
# held-out code perplexity below 2 % of the vocabulary (5 of 256) means a few codes carry
# everything (FSQ reaches 7 % on the photos in 400 steps, collapsed DAPS-NA runs 1 %).
COLLAPSE_ENTROPY = 0.1  # nats per token
COLLAPSE_PERPLEXITY = 0.02  # fraction of the codes


def collapse_reason(record: dict[str, Any], codes: int | None) -> str | None:
    """Why a metrics record (train or eval) shows a collapse, or None."""
    entropy = record.get("entropy")
    if isinstance(entropy, float) and entropy < COLLAPSE_ENTROPY:
        return f"per-token entropy {entropy:.3g} nats < {COLLAPSE_ENTROPY:g}"
    perplexity = record.get("test/code_perplexity", record.get("code_perplexity"))
    if isinstance(perplexity, float) and codes and perplexity < COLLAPSE_PERPLEXITY * codes:
        return f"code perplexity {perplexity:.3g} < {COLLAPSE_PERPLEXITY:.0%} of {codes} codes"
    return None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class TrainProgress:
    def __init__(self, total: int, start: int, facts: dict[str, Any], enabled: bool) -> None:
        self.enabled = enabled
        self.codes = facts.get("codes")
        self.warned: set[str] = set()  # each kind of collapse is reported once
        self.live: dict[str, str] = {}
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[live]}"),
            console=console,
            disable=not enabled,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, live="")
        if enabled:
            console.print(
                "[bold]model[/] " + ", ".join(f"{k}={_fmt(v)}" for k, v in facts.items() if v is not None)
            )

    def __enter__(self) -> "TrainProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, record: dict[str, Any]) -> None:
        for key in SHOWN:
            if key in record:
                self.live[key] = _fmt(record[key])
        if "test/psnr" in record:
            self.live["test psnr"] = f"{record['test/psnr']:.2f}"
        reason = collapse_reason(record, self.codes)
        if reason is not None:
            self.live["collapse"] = "yes"
            kind = reason.split(" ")[0]
            if self.enabled and kind not in self.warned:
                self.warned.add(kind)
                what = ("Each image's codes are nearly certain: its K samples coincide and the DAPS update "
                        "vanishes" if kind == "per-token" else "The encoder uses a handful of codes")
                self.progress.console.print(
                    f"[yellow]warning[/]: code collapse at step {step}: {reason}. {what}; levers in "
                    "docs/daps.md, 'Code collapse monitor'."
                )
        self.progress.update(
            self.task, completed=step, live="  ".join(f"{k} {v}" for k, v in self.live.items())
        )

    def finish(self, summary: dict[str, Any], out_dir: Path) -> None:
        if not self.enabled:
            return
        table = Table(title=f"held-out metrics after {summary['step']} steps ({summary['train_seconds']:.0f} s)")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in summary["metrics"].items():
            table.add_row(key, _fmt(value))
        console.print(table)
