"""Live training display (rich): a progress bar with loss, η, ESS and held-out PSNR, then a
final table. Only rank 0 shows it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# Logs and CI capture stderr without a terminal; 80 columns would truncate the live numbers.
console = Console(stderr=True, width=None if Console(stderr=True).is_terminal else 140)

SHOWN = ("loss", "eta", "ess", "beta")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class TrainProgress:
    def __init__(self, total: int, start: int, facts: dict[str, Any], enabled: bool) -> None:
        self.enabled = enabled
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
