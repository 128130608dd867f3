"""The training loop: one function, read top to bottom.

Runs unchanged as a plain process (it makes its own one-process group) or under
``torchrun``/``deepspeed`` launchers (it joins theirs)::

    ngkit run recipes/quickstart.toml
    torchrun --nproc_per_node 8 -m ngkit.cli.main run recipes/imagenet256.toml
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tomli_w

from ngkit import __version__
from ngkit.components import Encoder
from ngkit.data import train_batches
from ngkit.engine import checkpoint
from ngkit.engine.artifacts import JsonlWriter, read_jsonl, save_curves, save_grid, to_float
from ngkit.engine.build import build, build_metrics
from ngkit.engine.clipping import adaptive_clip_, grads_finite
from ngkit.engine.deepspeed_engine import DTYPES, make_engine
from ngkit.engine.distributed import init_distributed, pick_device, set_accelerator_env
from ngkit.engine.evaluate import evaluate
from ngkit.engine.progress import TrainProgress
from ngkit.engine.run_info import RunInfo
from ngkit.errors import NgkitError, TrainingError
from ngkit.plugins import get_plugin_manager
from ngkit.recipe import Recipe, recipe_to_dict

EXPENSIVE_METRICS = {"fid"}  # computed at the end of training only, not at every eval


@dataclass
class TrainResult:
    out_dir: Path
    summary: dict[str, Any]
    main: bool  # rank 0, which wrote the files
    records: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int, rank: int) -> None:
    """Same initial weights on every rank; sampling noise differs per rank."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def train(recipe: Recipe, out_dir: Path, *, resume: bool = False, quiet: bool = False) -> TrainResult:
    """Train ``recipe`` into ``out_dir``; returns the final summary (also in summary.json)."""
    device = pick_device(recipe.run.device)
    set_accelerator_env(device)
    dist = init_distributed(device, recipe.distributed.backend)
    main = dist.rank == 0
    run_cfg = recipe.run
    dtype = DTYPES[recipe.distributed.precision]
    ckpt_dir = out_dir / "checkpoints"
    resume_tag = checkpoint.latest_tag(ckpt_dir) if resume else None
    if not resume and (out_dir / "metrics.jsonl").exists():  # every rank stops, none waits
        raise NgkitError(
            f"{out_dir} already holds a run; continue it with --resume {out_dir}, "
            f"or choose another directory with --out"
        )

    # ---- build: components from the recipe, then the DeepSpeed engine around the method
    seed_everything(run_cfg.seed, dist.rank)
    built = build(recipe)
    method = built.method.to(device=dist.device)
    engine = make_engine(method, recipe)
    method = engine.module
    params = [p for p in method.parameters() if p.requires_grad]
    resolved = recipe_to_dict(recipe)
    pm = get_plugin_manager()
    encoder = getattr(built.method, "encoder", None)
    decoder = getattr(built.method, "decoder", None)
    facts = {
        "parameters": _param_count(method),
        "encoder_parameters": _param_count(encoder) if encoder is not None else None,
        "decoder_parameters": _param_count(decoder) if decoder is not None else None,
        "tokens": built.latent.tokens,
        "codes": built.latent.codes,
        "bits_per_image": built.latent.bits_per_image,
        "world_size": dist.world_size,
        "device": str(dist.device),
        "precision": recipe.distributed.precision,
        "zero_stage": recipe.distributed.zero_stage,
    }
    if isinstance(encoder, Encoder):
        facts.update({f"encoder_{k}": v for k, v in encoder.describe().items()})

    start_step = 0
    if resume_tag is not None:
        client = checkpoint.load(engine, ckpt_dir, resume_tag)
        start_step = int(client["step"])
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_text_atomic(out_dir / "recipe.toml", tomli_w.dumps(resolved))
        # The image and latent spec, so an export needs no dataset (photos computes mean/std from pixels).
        specs = {"image": vars(built.image), "latent": vars(built.latent)}
        checkpoint.write_text_atomic(out_dir / "specs.json", json.dumps(specs, indent=2) + "\n")
    run = RunInfo(out_dir, resolved, method, built.dataset, built.image, built.latent, dist.device, dist.rank, dist.world_size)

    # ---- data: a fresh stream position per (seed, resume point), so a resumed run sees new crops
    stream_seed = run_cfg.seed if start_step == 0 else run_cfg.seed * 1_000_003 + start_step
    batches = train_batches(
        built.dataset, recipe.data.batch_size, stream_seed, dist.rank, dist.world_size, recipe.data.workers
    )
    train_metrics = [m for m in recipe.eval.metrics if m not in EXPENSIVE_METRICS]

    def run_eval(step: int, names: list[str], num_images: int) -> Any:
        metrics = build_metrics(names, recipe.eval.options)
        return evaluate(
            method, built.dataset, metrics, num_images=num_images, batch_size=recipe.eval.batch_size,
            beta=built.beta(step), device=dist.device, rank=dist.rank, world_size=dist.world_size,
            keep=run_cfg.grid_images, dtype=dtype,
        )

    def save(step: int) -> Path:
        state = {"step": step, "ngkit_version": __version__, "recipe": resolved}
        path = checkpoint.save(engine, ckpt_dir, step, state, dist.rank, keep=3)
        if main:
            pm.hook.on_checkpoint(run=run, step=step, path=path)
        return path

    writer = JsonlWriter(out_dir / "metrics.jsonl") if main else None
    progress = TrainProgress(run_cfg.steps, start_step, facts, enabled=main and not quiet)
    if main:
        pm.hook.on_train_start(run=run)

    # ---- the loop
    window: dict[str, float] = defaultdict(float)
    window_steps, skipped, consecutive_skips = 0, 0, 0
    t_window, t_start = time.perf_counter(), time.perf_counter()
    step = start_step
    with progress:
        for step in range(start_step + 1, run_cfg.steps + 1):
            x = next(batches).to(dist.device, dtype, non_blocking=True)
            out = engine(x, step)
            engine.backward(out.loss)
            if recipe.optim.clip == "agc":
                adaptive_clip_(params, recipe.optim.clip_value)
            # Gradients are already averaged over ranks, so every rank takes the same decision;
            # the loss flag is reduced too, for ZeRO stages whose gradients are partitioned.
            ok = torch.tensor(float(torch.isfinite(out.loss).all() and grads_finite(params)), device=dist.device)
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
            if ok.item() > 0:
                engine.step()
                logs = {**out.logs, **method.after_step(step)}
                consecutive_skips = 0
            else:
                engine.zero_grad()
                skipped += 1
                consecutive_skips += 1
                logs = {}
                if consecutive_skips > recipe.optim.max_skipped_steps:
                    raise TrainingError(
                        f"{consecutive_skips} consecutive steps had a non-finite loss or gradient "
                        f"(last at step {step}); the last good checkpoint is in {ckpt_dir}. Lower "
                        f"[optim] lr, check the data, or resume with --resume {out_dir}"
                    )
            for key, value in logs.items():
                window[key] += to_float(value)
            window_steps += bool(logs)

            if step % run_cfg.log_every == 0 or step == run_cfg.steps:
                elapsed = time.perf_counter() - t_window
                n = max(1, window_steps)
                record = {"kind": "train", "step": step, **{k: v / n for k, v in window.items()}}
                record["lr"] = engine.get_lr()[0]
                record["images_per_s"] = n * recipe.data.batch_size * dist.world_size / max(elapsed, 1e-9)
                record["skipped_steps"] = skipped
                if main:
                    writer.write(record)
                    pm.hook.on_step_end(run=run, step=step, logs=record)
                progress.update(step, record)
                window.clear()
                window_steps, t_window = 0, time.perf_counter()

            if run_cfg.eval_every and step % run_cfg.eval_every == 0 and step != run_cfg.steps:
                result = run_eval(step, train_metrics, recipe.eval.periodic_images or recipe.eval.num_images)
                record = {"kind": "eval", "step": step, **{f"test/{k}": v for k, v in result.values.items()}}
                if main:
                    writer.write(record)
                    pm.hook.on_eval_end(run=run, step=step, metrics=result.values)
                progress.update(step, record)

            if run_cfg.checkpoint_every and step % run_cfg.checkpoint_every == 0 and step != run_cfg.steps:
                save(step)

    # ---- the end: checkpoint, full evaluation, pictures, summary
    train_seconds = time.perf_counter() - t_start
    if step > start_step or resume_tag is None:
        save(step)
    result = run_eval(step, recipe.eval.metrics, recipe.eval.num_images)
    summary = {
        "recipe": resolved.get("method", {}).get("name"),
        "step": step,
        "train_seconds": train_seconds,
        "skipped_steps": skipped,
        "beta": built.beta(step),
        "metrics": result.values,
        "protocol": result.protocols,
        "eval_images": recipe.eval.num_images,
        **facts,
        "versions": {"ngkit": __version__, "torch": torch.__version__},
    }
    records: list[dict[str, Any]] = []
    if main:
        writer.write({"kind": "eval", "step": step, **{f"test/{k}": v for k, v in result.values.items()}})
        writer.close()
        save_grid(out_dir / "reconstructions.png", result.images, result.reconstructions)
        records = read_jsonl(out_dir / "metrics.jsonl")
        save_curves(out_dir / "curves.png", records, f"{out_dir.name}: {resolved['method']['name']}")
        checkpoint.write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
        pm.hook.on_train_end(run=run, summary=summary)
    progress.finish(summary, out_dir)
    return TrainResult(out_dir, summary, main, records)
