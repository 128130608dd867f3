"""What a run leaves for people to look at: metrics.jsonl, a reconstruction grid, curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor


class JsonlWriter:
    """Appends one JSON object per line and flushes, so a killed run keeps what it logged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete record; a line torn by a crash mid-write is left out."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the records up to ``last_step`` (a resumed run logs the later steps again)."""
    from ngkit.engine.checkpoint import write_text_atomic

    kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= last_step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def grid_array(rows: list[Tensor], min_size: int = 64, pad: int = 2) -> np.ndarray:
    """Rows of ``[N, C, H, W]`` images in [0, 1] -> one uint8 RGB picture, upscaled (nearest)
    so that tiny images stay visible."""
    n = max(r.shape[0] for r in rows)
    c, h, w = rows[0].shape[1:]
    scale = max(1, math.ceil(min_size / max(h, w)))
    hs, ws = h * scale, w * scale
    out = np.ones(((hs + pad) * len(rows) + pad, (ws + pad) * n + pad, 3), dtype=np.float32)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            arr = img.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0)
            arr = np.repeat(np.repeat(arr, scale, 0), scale, 1)
            if c == 1:
                arr = np.repeat(arr, 3, 2)
            top, left = pad + i * (hs + pad), pad + j * (ws + pad)
            out[top : top + hs, left : left + ws] = arr
    return (out * 255).round().astype(np.uint8)


def save_grid(path: Path, originals: Tensor, reconstructions: Tensor) -> None:
    """Originals on the top row, their reconstructions beneath."""
    from PIL import Image

    Image.fromarray(grid_array([originals, reconstructions])).save(path)


def save_curves(path: Path, records: list[dict[str, Any]], title: str) -> None:
    """Training losses and held-out metrics against steps, one panel per quantity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    shown = ("loss", "gen_loss", "policy_loss", "eta", "ess", "beta", "kl", "encoder_kl", "entropy", "tr_alpha")
    panels = [k for k in shown if any(k in r for r in train)]
    panels += [k for k in ("test/psnr", "test/usage", "test/code_perplexity") if any(k in r for r in evals)]
    if not panels:
        return
    cols = min(3, len(panels))
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(4.2 * cols, 3.2 * math.ceil(len(panels) / cols)), squeeze=False)
    for ax, key in zip(axes.flat, panels):
        src = evals if key.startswith("test/") else train
        pts = [(r["step"], r[key]) for r in src if key in r and r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if key.startswith("test/") else None, lw=1)
        ax.set_title(key)
        ax.set_xlabel("step")
        if key in ("eta", "encoder_kl", "tr_alpha"):
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
