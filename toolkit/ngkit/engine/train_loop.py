"""The training loop: one function, read top to bottom.

Runs unchanged as a plain process (it makes its own one-process group) or under any launcher
(``torchrun``, ``deepspeed``, ``srun``, ``mpirun``; see :mod:`ngkit.engine.distributed`)::

    ngkit run recipes/quickstart.toml
    torchrun --nproc_per_node 8 -m ngkit.cli.main run recipes/imagenet256.toml
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tomli_w

from ngkit import __version__
from ngkit.components import Encoder
from ngkit.data import Position, TrainBatches, check_dataset
from ngkit.engine import checkpoint
from ngkit.engine.artifacts import JsonlWriter, read_jsonl, save_curves, save_grid, truncate_jsonl
from ngkit.engine.build import Built, build, build_metrics
from ngkit.engine.deepspeed_engine import DTYPES, denormal_mode, make_engine
from ngkit.engine.distributed import init_distributed, pick_device, set_accelerator_env
from ngkit.engine.ema import STATE_KEY as EMA_KEY, make_ema, weights_for_eval
from ngkit.engine.evaluate import evaluate
from ngkit.engine.progress import TrainProgress
from ngkit.engine.run_info import RunInfo
from ngkit.engine.signals import StopSignals
from ngkit.engine.step import StepPlan, train_step
from ngkit.errors import NgkitError, RunStopped, TrainingError
from ngkit.losses import STATE_KEY as LOSSES_KEY, attach_losses, build_losses, load_losses_state, losses_state
from ngkit.plugins import get_plugin_manager
from ngkit.recipe import Recipe, recipe_to_dict

EXPENSIVE_METRICS = {"fid"}  # computed at the end of training only, not at every eval


@dataclass
class TrainResult:
    out_dir: Path
    summary: dict[str, Any]
    main: bool  # rank 0, which wrote the files
    records: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int, rank: int | None = None) -> None:
    """Seed torch, numpy and python: with ``rank`` None the same on every rank (initial weights),
    else a stream of this rank's own (sampling noise must differ between ranks)."""
    key = [seed] if rank is None else [seed, 1 + rank]
    state = np.random.SeedSequence(key).generate_state(2)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))
    random.seed(int(state[0]))


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def train(
    recipe: Recipe, out_dir: Path, *, resume: bool = False, quiet: bool = False,
    builder: Callable[[Recipe], Built] = build,
) -> TrainResult:
    """Train ``recipe`` into ``out_dir``; returns the final summary (also in summary.json).
    ``builder`` makes the components (another one trains e.g. a prior over a tokenizer's codes)."""
    device = pick_device(recipe.run.device)
    set_accelerator_env(device)
    dist = init_distributed(device, recipe.distributed.backend)
    main = dist.rank == 0
    run_cfg, optim_cfg = recipe.run, recipe.optim
    dtype = DTYPES[recipe.distributed.precision]
    ckpt_dir = out_dir / "checkpoints"
    if not resume and (out_dir / "metrics.jsonl").exists():  # every rank stops, none waits
        raise NgkitError(
            f"{out_dir} already holds a run; continue it with --resume {out_dir}, "
            f"or choose another directory with --out"
        )
    resume_tag = checkpoint.latest_tag(ckpt_dir) if resume else None
    if resume and resume_tag is None:
        raise NgkitError(
            f"--resume {out_dir}: no complete checkpoint in {ckpt_dir}; start a new run with "
            f"ngkit run RECIPE --out NEW_DIR (or set [run] checkpoint_every so that runs save as they go)"
        )

    # ---- build: components from the recipe (same initial weights on every rank), data checked;
    # nothing is written before this has passed
    seed_everything(run_cfg.seed)
    built = builder(recipe)
    check_dataset(built.dataset, run_cfg.seed, dist.rank, dist.world_size)
    checkpoint.check_shared_dir(out_dir, dist.rank)
    method = built.method.to(device=dist.device)
    losses = build_losses([t.model_dump() for t in recipe.loss], {"image": built.image, "latent": built.latent,
                                                                   "total_steps": run_cfg.steps})
    attach_losses(method, losses, dist.device)  # [[loss]]: terms of the decoder log-likelihood
    engine = make_engine(method, recipe)
    method = engine.module
    ema = make_ema(method, run_cfg.ema, recipe.distributed.zero_stage)  # EMA: the average
    resolved = recipe_to_dict(recipe)
    trained = (resolved.get("method") or resolved.get("prior") or {}).get("name")  # what the recipe trains
    pm = get_plugin_manager()
    encoder = getattr(built.method, "encoder", None)
    decoder = getattr(built.method, "decoder", None)
    global_batch = recipe.data.batch_size * optim_cfg.accumulate * dist.world_size
    facts = {
        "parameters": _param_count(method),
        "encoder_parameters": _param_count(encoder) if encoder is not None else None,
        "decoder_parameters": _param_count(decoder) if decoder is not None else None,
        "tokens": built.latent.tokens,
        "codes": built.latent.codes,
        "bits_per_image": built.latent.bits_per_image,
        "world_size": dist.world_size,
        "global_batch": global_batch,
        "accumulate": optim_cfg.accumulate,
        "device": str(dist.device),
        "precision": recipe.distributed.precision,
        "zero_stage": recipe.distributed.zero_stage,
    }
    if isinstance(encoder, Encoder):
        facts.update({f"encoder_{k}": v for k, v in encoder.describe().items()})

    # ---- resume: weights, optimiser, schedule, then this rank's data position and generators
    seed_everything(run_cfg.seed, dist.rank)
    start_step, position, unreadable = 0, Position(), set()
    if resume_tag is not None:
        client, own = checkpoint.load(engine, ckpt_dir, resume_tag, dist.rank)
        start_step = int(client["step"])
        if ema is not None and EMA_KEY in client:  # EMA: resumed bit for bit
            ema.load_state_dict(client[EMA_KEY], str(ckpt_dir / resume_tag))
        load_losses_state(losses, client.get(LOSSES_KEY, {}))  # [[loss]]: e.g. the discriminator
        saved_world = int(client.get("world_size", dist.world_size))
        if own is not None and saved_world == dist.world_size:
            position, unreadable = Position(**own["data"]), set(own.get("unreadable", ()))
            set_rng_state(own["rng"])
        else:  # another number of ranks: the shards differ, so start the next epoch afresh
            position = Position(epoch=int(client.get("max_epoch", 0)) + 1)
            if main:
                print(f"resuming {saved_world}-rank checkpoint on {dist.world_size} ranks: data restart at epoch {position.epoch}")
        if main:
            print(f"resuming from {ckpt_dir / resume_tag} (step {start_step})")
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_text_atomic(out_dir / "recipe.toml", tomli_w.dumps(resolved))
        # The image and latent spec, so an export needs no dataset (photos computes mean/std from pixels).
        specs = {"image": vars(built.image), "latent": vars(built.latent)}
        checkpoint.write_text_atomic(out_dir / "specs.json", json.dumps(specs, indent=2) + "\n")
        if resume_tag is not None:
            truncate_jsonl(out_dir / "metrics.jsonl", start_step)
    run = RunInfo(out_dir, resolved, method, built.dataset, built.image, built.latent, dist.device, dist.rank, dist.world_size)

    batches = TrainBatches(
        built.dataset, recipe.data.batch_size, run_cfg.seed, dist.rank, dist.world_size,
        recipe.data.workers, position, recipe.data.max_unreadable, unreadable,
    )
    train_metrics = [m for m in recipe.eval.metrics if m not in EXPENSIVE_METRICS]

    def run_eval(step: int, names: list[str], num_images: int) -> Any:
        metrics = build_metrics(names, recipe.eval.options)
        with weights_for_eval(ema, method):  # EMA: evaluated with the averaged weights
            return evaluate(
                method, built.dataset, metrics, num_images=num_images, batch_size=recipe.eval.batch_size,
                beta=built.beta(step), device=dist.device, rank=dist.rank, world_size=dist.world_size,
                keep=run_cfg.grid_images, dtype=dtype,
            )

    def save(step: int) -> Path:
        epochs = torch.tensor([float(batches.position.epoch)])
        torch.distributed.all_reduce(epochs, op=torch.distributed.ReduceOp.MAX)
        state = {"step": step, "ngkit_version": __version__, "recipe": resolved,
                 "world_size": dist.world_size, "max_epoch": int(epochs.item())}
        if ema is not None:  # EMA: checkpointed in the client state
            state[EMA_KEY] = ema.state_dict()
        state[LOSSES_KEY] = losses_state(losses)  # [[loss]]: their own training state
        own = {"data": batches.state(), "rng": rng_state(), "unreadable": sorted(batches.unreadable)}
        path = checkpoint.save(engine, ckpt_dir, step, state, own, dist.rank, dist.world_size, keep=run_cfg.keep_checkpoints)
        if main:
            pm.hook.on_checkpoint(run=run, step=step, path=path)
        return path

    writer = JsonlWriter(out_dir / "metrics.jsonl") if main else None
    progress = TrainProgress(run_cfg.steps, start_step, facts, enabled=main and not quiet)
    if main:
        pm.hook.on_train_start(run=run)

    # ---- the loop: one optimiser step (`accumulate` micro-batches, see ngkit.engine.step) at a time
    plan = StepPlan.of(engine, recipe, dist.device, dtype)
    window: dict[str, float] = defaultdict(float)
    window_steps, window_applied, skipped, consecutive_skips = 0, 0, 0, 0
    t_window, t_start, t_saved = time.perf_counter(), time.perf_counter(), time.perf_counter()
    step, saved_step, stop_signal, save_due = start_step, start_step if resume_tag else None, None, False

    def save_overdue() -> bool:
        return run_cfg.checkpoint_minutes > 0 and time.perf_counter() - t_saved > 60 * run_cfg.checkpoint_minutes

    with progress, StopSignals() as signals, denormal_mode(recipe, dist.device):
        for step in range(start_step + 1, run_cfg.steps + 1):
            taken = train_step(engine, batches, step, plan, stop_requested=lambda: signals.requested,
                               save_overdue=save_overdue)
            save_due = save_due or taken.save_due
            if taken.stop and stop_signal is None:
                stop_signal = signals.name or "a signal to another rank"
            window_steps += 1
            if taken.applied:
                if ema is not None:  # EMA: only applied steps move the average
                    ema.update(method)
                for key, value in taken.logs.items():
                    window[key] += value
                window_applied += 1
                consecutive_skips = 0
            else:
                skipped += 1
                consecutive_skips += 1
                if consecutive_skips > optim_cfg.max_skipped_steps:
                    newest = checkpoint.latest_tag(ckpt_dir)
                    where = f"the newest complete checkpoint is {ckpt_dir / newest}" if newest else "no checkpoint was saved yet"
                    raise TrainingError(
                        f"{consecutive_skips} consecutive steps had a non-finite loss or gradient "
                        f"(last at step {step}); {where}. Lower [optim] lr or check the data, then "
                        f"resume with --resume {out_dir} --set optim.lr=..."
                    )

            if step % run_cfg.log_every == 0 or step == run_cfg.steps:
                elapsed = time.perf_counter() - t_window
                record = {"kind": "train", "step": step, **{k: v / max(1, window_applied) for k, v in window.items()}}
                record["lr"] = engine.get_lr()[0]
                record["images_per_s"] = window_steps * global_batch / max(elapsed, 1e-9)
                record["skipped_steps"] = skipped
                if main:
                    writer.write(record)
                    pm.hook.on_step_end(run=run, step=step, logs=record)
                progress.update(step, record)
                window.clear()
                window_steps, window_applied, t_window = 0, 0, time.perf_counter()

            if run_cfg.eval_every and step % run_cfg.eval_every == 0 and step != run_cfg.steps:
                result = run_eval(step, train_metrics, recipe.eval.periodic_images or recipe.eval.num_images)
                record = {"kind": "eval", "step": step, **{f"test/{k}": v for k, v in result.values.items()}}
                if main:
                    writer.write(record)
                    pm.hook.on_eval_end(run=run, step=step, metrics=result.values)
                progress.update(step, record)

            every = run_cfg.checkpoint_every and step % run_cfg.checkpoint_every == 0
            if step != run_cfg.steps and (every or save_due or stop_signal):
                save(step)
                saved_step, t_saved, save_due = step, time.perf_counter(), False
            if stop_signal:
                break

    if stop_signal:
        if main:
            writer.close()
        raise RunStopped(
            f"stopped by {stop_signal} after step {step}; checkpoint saved in {ckpt_dir / checkpoint.step_tag(step)}. "
            f"Continue with: ngkit run --resume {out_dir}",
            exit_code=130 if stop_signal == "SIGINT" else 0,
        )

    # ---- the end: checkpoint, full evaluation, pictures, summary
    train_seconds = time.perf_counter() - t_start
    if saved_step != step:
        save(step)
    result = run_eval(step, recipe.eval.metrics, recipe.eval.num_images)
    summary = {
        "recipe": trained,
        "step": step,
        "train_seconds": train_seconds,
        "skipped_steps": skipped,
        "unreadable_images": len(batches.unreadable),
        "beta": built.beta(step),
        "metrics": result.values,
        "protocol": result.protocols,
        "eval_images": result.num_images,
        **facts,
        "versions": {"ngkit": __version__, "torch": torch.__version__},
    }
    records: list[dict[str, Any]] = []
    if main:
        writer.write({"kind": "eval", "step": step, **{f"test/{k}": v for k, v in result.values.items()}})
        writer.close()
        save_grid(out_dir / "reconstructions.png", result.images, result.reconstructions)
        records = read_jsonl(out_dir / "metrics.jsonl")
        save_curves(out_dir / "curves.png", records, f"{out_dir.name}: {trained}")
        checkpoint.write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
        pm.hook.on_train_end(run=run, summary=summary)
    progress.finish(summary, out_dir)
    return TrainResult(out_dir, summary, main, records)
