"""``ngkit export``: a run's checkpoint -> ``config.json`` + ``model.safetensors`` + ``README.md``
model card (docs/tokenizer.md).

    ngkit export runs/quickstart                  # latest checkpoint -> runs/quickstart/export
    ngkit export runs/quickstart --step 400 --out quickstart-400
    ngkit export runs/quickstart --push-to-hub user/quickstart   # needs `hf auth login`
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)


def export_command(
    target: Path = typer.Argument(..., help="Run directory, or a checkpoint RUN/checkpoints/step-N."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder to write (default: RUN/export)."),
    step: Optional[int] = typer.Option(None, "--step", help="Export this saved step instead of the latest."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 (default, also for bf16 runs), bfloat16 or float16."),
    weights: Optional[str] = typer.Option(
        None, "--weights", help="ema (the [run] ema weight average; the default when the run kept one) or raw."
    ),
    push_to_hub: Optional[str] = typer.Option(
        None, "--push-to-hub", help="Also upload the export to this Hugging Face Hub repository (user/name)."
    ),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repository private."),
) -> None:
    """Export a trained tokenizer: its weights and everything needed to rebuild it."""
    from ngkit.engine.load import locate
    from ngkit.export import CONFIG, WEIGHTS, card_for, export, write_export

    run_dir, _ = locate(target, step)
    out = out or run_dir / "export"
    snap = export(target, out, step=step, dtype=dtype, weights=weights)
    numel = sum(t.numel() for t in snap.state.values())
    size = (out / WEIGHTS).stat().st_size
    latent = snap.config["latent"]
    console.print(
        f"exported {escape(snap.config['method'])} ({snap.config['weights']} weights) at step {snap.config['step']} to {escape(str(out))}: "
        f"{WEIGHTS} ({numel:,} {dtype} values, {size / 2**20:.2f} MiB) and {CONFIG}; "
        f"{latent['tokens']} tokens x {latent['codes']} codes"
    )
    if push_to_hub:
        from ngkit.hub import push

        snap.card = card_for(snap.config, run_dir, repo_id=push_to_hub)  # its load example names the repository
        write_export(snap, out)
        url = push(out, push_to_hub, private=private)
        console.print(f"pushed to {escape(url)}")
    where = push_to_hub or str(out)
    console.print(f'load it with: import ngkit; tok = ngkit.load("{escape(where)}")')
