"""Experiment trackers: TensorBoard and Weights & Biases, fed from the run hooks.

Enabled per run by ``[run] trackers = ["tensorboard", "wandb"]`` (or ``ngkit run --tracker
tensorboard``). Each tracker gets what ``metrics.jsonl`` gets, under the same names and steps
(training records: loss terms, ``lr``, ``images_per_s``...; held-out ones: ``test/<metric>``),
the resolved recipe, and the final reconstruction grid. The hooks run on rank 0 only, so only
rank 0 writes.

- TensorBoard (``pip install tensorboard``, the ``trackers`` extra): event files in
  ``RUN/tensorboard``; ``tensorboard --logdir RUN/tensorboard``. A resumed run purges the events
  after the checkpoint it resumed from, as ``metrics.jsonl`` is truncated there.
- W&B (``pip install wandb``): offline unless ``WANDB_MODE`` says otherwise (no account or
  internet needed; ``wandb sync RUN/wandb/offline-run-*`` uploads later); project
  ``$WANDB_PROJECT`` (default ``ngkit``); the run id is kept in ``RUN/wandb-id`` so a resumed run
  continues the same W&B run.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Protocol

import tomli_w

from ngkit import hookimpl
from ngkit.errors import NgkitError

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")


class Tracker(Protocol):
    def scalars(self, values: dict[str, float], step: int) -> None: ...

    def image(self, name: str, path: Path, step: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _missing(package: str, tracker: str) -> NgkitError:
    return NgkitError(
        f'[run.trackers] "{tracker}" needs the {package} package, which is not installed; '
        f"pip install {package} (or ngkit[trackers]), or remove it from [run] trackers"
    )


def _last_step(out_dir: Path) -> int:
    """The last step ``metrics.jsonl`` holds (0 for a new run): a resumed run starts after it
    (the training loop has truncated the log to its checkpoint before ``on_train_start``)."""
    import json

    path = out_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return max((int(json.loads(line)["step"]) for line in lines if line.strip()), default=0)


class TensorBoard:
    def __init__(self, out_dir: Path, recipe: dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboard") from None
        resumed_at = _last_step(out_dir)
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resumed_at + 1 if resumed_at else None)
        # Markdown: four-space indentation shows the TOML verbatim.
        text = "".join(f"    {line}\n" for line in tomli_w.dumps(recipe).splitlines())
        self.writer.add_text("recipe", text, resumed_at)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def image(self, name: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        self.writer.add_image(name, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, out_dir: Path, recipe: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        id_file = out_dir / "wandb-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "ngkit"), name=out_dir.name, id=run_id, resume="allow",
            dir=str(out_dir), config=recipe, mode=os.environ.get("WANDB_MODE", "offline"),
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def image(self, name: str, path: Path, step: int) -> None:
        self.run.log({name: self.wandb.Image(str(path))}, step=step)

    def flush(self) -> None:
        """W&B streams as it goes."""

    def close(self) -> None:
        self.run.finish()


TRACKERS: dict[str, type] = {"tensorboard": TensorBoard, "wandb": WandB}
_open: dict[int, list[Tracker]] = {}  # id of the run's RunInfo (the same object in every hook) -> its trackers


def _trackers(run: Any) -> list[Tracker]:
    return _open.get(id(run), [])


@hookimpl
def on_train_start(run: Any) -> None:
    recipe = getattr(run, "recipe", None) or {}  # a RunInfo; hooks are also called with partial stand-ins
    names = recipe.get("run", {}).get("trackers", [])
    if names:
        _open[id(run)] = [TRACKERS[name](Path(run.out_dir), run.recipe) for name in names]


@hookimpl
def on_step_end(run: Any, step: int, logs: dict[str, float]) -> None:
    values = {k: float(v) for k, v in logs.items() if k not in ("kind", "step") and isinstance(v, (int, float))}
    for tracker in _trackers(run):
        tracker.scalars(values, step)


@hookimpl
def on_eval_end(run: Any, step: int, metrics: dict[str, float]) -> None:
    for tracker in _trackers(run):
        tracker.scalars({f"test/{k}": float(v) for k, v in metrics.items()}, step)


@hookimpl
def on_checkpoint(run: Any, step: int, path: Path) -> None:
    for tracker in _trackers(run):  # what a preempted run logged survives with its checkpoint
        tracker.flush()


@hookimpl
def on_train_end(run: Any, summary: dict[str, Any]) -> None:
    """The final held-out evaluation (logged to metrics.jsonl but not through on_eval_end), the
    reconstruction grid, then close."""
    trackers = _open.pop(id(run), [])
    if not trackers:
        return
    step = int(summary["step"])
    grid = Path(run.out_dir) / "reconstructions.png"
    for tracker in trackers:
        tracker.scalars({f"test/{k}": float(v) for k, v in summary["metrics"].items()}, step)
        if grid.is_file():
            tracker.image("reconstructions", grid, step)
        tracker.close()
