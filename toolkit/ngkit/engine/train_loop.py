"""The training recipe, in the order it runs: :func:`setup`, :func:`resume_point`, :func:`open_run`,
:func:`loop`, :func:`finish` (torchtune's recipe shape); :func:`train` calls them in turn.

Runs unchanged as a plain process (it makes its own one-process group) or under any launcher
(``torchrun``, ``deepspeed``, ``srun``, ``mpirun``; see :mod:`ngkit.engine.distributed`)::

    ngkit run recipes/quickstart.toml
    torchrun --nproc_per_node 8 -m ngkit.cli.main run recipes/imagenet256.toml
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import tomli_w

from ngkit import __version__
from ngkit.components import LOGS_READ, Encoder, Method
from ngkit.data import Position, TrainBatches, check_dataset
from ngkit.engine import checkpoint, rank_state
from ngkit.engine.artifacts import JsonlWriter, read_jsonl, save_curves, save_grid, truncate_jsonl
from ngkit.engine.buffers import broadcast_buffers
from ngkit.engine.build import Built, build, build_metrics
from ngkit.engine.deepspeed_engine import DTYPES, denormal_mode, make_engine
from ngkit.engine.distributed import DistInfo, all_ranks_agree, init_distributed, pick_device, set_accelerator_env
from ngkit.engine.ema import STATE_KEY as EMA_KEY, Ema, make_ema, weights_for_eval
from ngkit.engine.evaluate import EvalResult, evaluate
from ngkit.engine.lock import holds_run_dir
from ngkit.engine.progress import TrainProgress
from ngkit.engine.run_info import RunInfo
from ngkit.engine.seeding import rng_state, seed_everything, set_rng_state
from ngkit.engine.signals import StopSignals
from ngkit.engine.step import StepPlan, host_floats, logs_read_at, train_step
from ngkit.errors import NgkitError, RunStopped, TrainingError
from ngkit.losses import STATE_KEY as LOSSES_KEY, WeightedLoss, attach_losses, build_losses, load_losses_state, losses_state
from ngkit.plugins import get_plugin_manager, get_registry
from ngkit.recipe import Recipe, recipe_to_dict

__all__ = ["TrainResult", "seed_everything", "train"]

@dataclass
class TrainResult:
    out_dir: Path
    summary: dict[str, Any]
    main: bool  # rank 0, which wrote the files
    records: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Trainer:
    """What :func:`setup` makes and the later parts share; :func:`open_run` fills the rest."""

    recipe: Recipe
    out_dir: Path
    dist: DistInfo
    built: Built
    engine: Any  # the DeepSpeed engine
    method: Method  # engine.module
    resume_tag: str | None  # the checkpoint to continue from
    resolved: dict[str, Any]  # the recipe as written to recipe.toml
    trained: str | None  # what the recipe trains (the method's or prior's name)
    facts: dict[str, Any]  # sizes and setup, shown at the start and kept in summary.json
    ema: Ema | None = None  # [run] ema: the weight average (ngkit.engine.ema)
    losses: list[WeightedLoss] = field(default_factory=list)  # [[loss]] tables (ngkit.losses)
    run: RunInfo | None = None
    batches: TrainBatches | None = None
    writer: JsonlWriter | None = None  # rank 0 only
    progress: TrainProgress | None = None

    @property
    def main(self) -> bool:
        return self.dist.rank == 0

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.recipe.distributed.precision]


@dataclass
class Start:
    """Where training starts: the step done, this rank's data position and skipped files."""

    step: int = 0
    position: Position = field(default_factory=Position)
    unreadable: set[str] = field(default_factory=set)


@dataclass
class Loop:
    """Where the loop stands, for its own logging and for :func:`finish`."""

    step: int
    saved_step: int | None  # the last step checkpointed
    skipped: int = 0  # steps skipped for a non-finite loss or gradient, in total
    consecutive_skips: int = 0
    stop_signal: str | None = None
    save_due: bool = False  # a rank asked for a checkpoint at the next chance
    t_start: float = field(default_factory=time.perf_counter)
    t_saved: float = field(default_factory=time.perf_counter)
    # sums since the last log: floats, and float64 scalars left on the device by the step
    window: dict[str, Any] = field(default_factory=lambda: defaultdict(float))
    window_counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # applied steps with the key
    window_steps: int = 0
    t_window: float = field(default_factory=time.perf_counter)


@holds_run_dir  # one live run per directory (ngkit.engine.lock)
def train(
    recipe: Recipe, out_dir: Path, *, resume: bool = False, quiet: bool = False,
    builder: Callable[[Recipe], Built] = build,
) -> TrainResult:
    """Train ``recipe`` into ``out_dir``; returns the final summary (also in summary.json).
    ``builder`` makes the components (another one trains e.g. a prior over a tokenizer's codes)."""
    trainer = setup(recipe, out_dir, resume, builder)
    start = resume_point(trainer)
    open_run(trainer, start, quiet)
    with trainer.progress, StopSignals() as signals, denormal_mode(recipe, trainer.dist.device):
        state = loop(trainer, start, signals)
    if state.stop_signal:
        stopped(trainer, state)
    return finish(trainer, state)


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def setup(recipe: Recipe, out_dir: Path, resume: bool, builder: Callable[[Recipe], Built]) -> Trainer:
    """Process group, components (the same initial weights on every rank), checked data, the
    engine. Nothing is written before this has passed."""
    device = pick_device(recipe.run.device)
    set_accelerator_env(device)
    dist = init_distributed(device, recipe.distributed.backend)
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
    seed_everything(recipe.run.seed)
    built = builder(recipe)
    check_dataset(built.dataset, recipe.run.seed, dist.rank, dist.world_size)
    checkpoint.check_shared_dir(out_dir, dist.rank)
    method = built.method.to(device=dist.device)
    context = {"image": built.image, "latent": built.latent, "total_steps": recipe.run.steps}
    losses = build_losses([t.model_dump() for t in getattr(recipe, "loss", [])], context)  # a prior recipe has none
    attach_losses(method, losses, dist.device)  # [[loss]]: terms of the decoder log-likelihood
    engine = make_engine(method, recipe)
    ema = make_ema(engine.module, recipe.run.ema, recipe.distributed.zero_stage)  # [run] ema
    resolved = recipe_to_dict(recipe)
    trained = (resolved.get("method") or resolved.get("prior") or {}).get("name")
    return Trainer(recipe, out_dir, dist, built, engine, engine.module, resume_tag, resolved, trained,
                   _facts(recipe, built, engine.module, dist), ema, losses)


def _facts(recipe: Recipe, built: Built, method: Method, dist: DistInfo) -> dict[str, Any]:
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
        "global_batch": recipe.data.batch_size * recipe.optim.accumulate * dist.world_size,
        "accumulate": recipe.optim.accumulate,
        "device": str(dist.device),
        "precision": recipe.distributed.precision,
        "zero_stage": recipe.distributed.zero_stage,
    }
    if isinstance(encoder, Encoder):
        facts.update({f"encoder_{k}": v for k, v in encoder.describe().items()})
    return facts


def resume_point(t: Trainer) -> Start:
    """Seed this rank's own stream; with a checkpoint to continue, load weights, optimiser and
    schedule, then this rank's data position and generators."""
    seed_everything(t.recipe.run.seed, t.dist.rank)
    if t.resume_tag is None:
        return Start()
    client, own = checkpoint.load(t.engine, t.ckpt_dir, t.resume_tag, t.dist.rank)
    start = Start(int(client["step"]))
    if t.ema is not None and EMA_KEY in client:  # [run] ema: resumed bit for bit
        t.ema.load_state_dict(client[EMA_KEY], str(t.ckpt_dir / t.resume_tag))
    load_losses_state(t.losses, client.get(LOSSES_KEY, {}))  # [[loss]]: e.g. the discriminator
    saved_world = int(client.get("world_size", t.dist.world_size))
    if own is not None and saved_world == t.dist.world_size:
        start.position, start.unreadable = Position(**own["data"]), set(own.get("unreadable", ()))
        set_rng_state(own["rng"])
        rank_state.restore(t.method, own.get("method", {}))
    else:  # another number of ranks: the shards differ, so start the next epoch afresh
        start.position = Position(epoch=int(client.get("max_epoch", 0)) + 1)
        if t.main:
            print(f"resuming {saved_world}-rank checkpoint on {t.dist.world_size} ranks: data restart at epoch {start.position.epoch}")
    if t.main:
        print(f"resuming from {t.ckpt_dir / t.resume_tag} (step {start.step})")
    return start


def open_run(t: Trainer, start: Start, quiet: bool) -> None:
    """Rank 0 writes recipe.toml and specs.json (and drops the log past a resumed step); every
    rank opens its data stream; the run hooks hear ``on_train_start``."""
    if t.main:
        t.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_text_atomic(t.out_dir / "recipe.toml", tomli_w.dumps(t.resolved))
        # The image and latent spec, so an export needs no dataset (photos computes mean/std from pixels).
        specs = {"image": vars(t.built.image), "latent": vars(t.built.latent)}
        checkpoint.write_text_atomic(t.out_dir / "specs.json", json.dumps(specs, indent=2) + "\n")
        if t.resume_tag is not None:
            truncate_jsonl(t.out_dir / "metrics.jsonl", start.step)
    b, dist = t.built, t.dist
    t.run = RunInfo(t.out_dir, t.resolved, t.method, b.dataset, b.image, b.latent, dist.device, dist.rank, dist.world_size)
    data, seed = t.recipe.data, t.recipe.run.seed
    t.batches = TrainBatches(b.dataset, data.batch_size, seed, dist.rank, dist.world_size, data.workers,
                             start.position, data.max_unreadable, start.unreadable)
    t.writer = JsonlWriter(t.out_dir / "metrics.jsonl") if t.main else None
    t.progress = TrainProgress(t.recipe.run.steps, start.step, t.facts, enabled=t.main and not quiet)
    if t.main:
        get_plugin_manager().hook.on_train_start(run=t.run)


def loop(t: Trainer, start: Start, signals: StopSignals) -> Loop:
    """One optimiser step (``accumulate`` micro-batches, see :mod:`ngkit.engine.step`) at a time:
    step, log, evaluate, checkpoint; leaves early, checkpointed, on a stop signal, and ends at
    the first step past ``[run] seconds``."""
    run_cfg, recipe = t.recipe.run, t.recipe
    state = Loop(step=start.step, saved_step=start.step if t.resume_tag else None)
    plan = StepPlan.of(t.engine, recipe, t.dist.device, t.dtype)
    periodic = [m for m in recipe.eval.metrics if not expensive(m)]

    def save_overdue() -> bool:
        return run_cfg.checkpoint_minutes > 0 and time.perf_counter() - state.t_saved > 60 * run_cfg.checkpoint_minutes

    step_s = 0.0  # the last step's wall time, to foresee the last step of a [run] seconds budget
    for step in range(start.step + 1, run_cfg.steps + 1):
        state.step = step
        t_step = time.perf_counter()
        read = LOGS_READ.set(logs_read_at(step, run_cfg.log_every, run_cfg.steps, run_cfg.seconds,
                                          t_step - state.t_start, step_s))
        try:
            taken = train_step(t.engine, t.batches, step, plan, stop_requested=lambda: signals.requested,
                               save_overdue=save_overdue)
        finally:
            LOGS_READ.reset(read)
        step_s = time.perf_counter() - t_step
        broadcast_buffers(t.method)
        state.save_due = state.save_due or taken.save_due
        # [run] seconds: every rank ends at the first step past the budget (rank clocks differ: one all-reduce)
        out_of_time = bool(run_cfg.seconds) and not all_ranks_agree(
            time.perf_counter() - state.t_start < run_cfg.seconds, device=t.dist.device)[0]
        last = step == run_cfg.steps or out_of_time
        if taken.stop and state.stop_signal is None:
            state.stop_signal = signals.name or "a signal to another rank"
        if taken.applied and t.ema is not None:  # [run] ema: only applied steps move the average
            t.ema.update(t.method)
        _count(t, state, taken.applied, taken.logs)
        if step % run_cfg.log_every == 0 or last:
            _log_window(t, state)
        if run_cfg.eval_every and step % run_cfg.eval_every == 0 and not last:
            result = run_eval(t, step, periodic, recipe.eval.periodic_images or recipe.eval.num_images)
            record = _eval_record(step, result)
            if t.main:
                t.writer.write(record)
                get_plugin_manager().hook.on_eval_end(run=t.run, step=step, metrics=result.values)
            t.progress.update(step, record)
        every = run_cfg.checkpoint_every and step % run_cfg.checkpoint_every == 0
        if not last and (every or state.save_due or state.stop_signal):
            save(t, step)
            state.saved_step, state.t_saved, state.save_due = step, time.perf_counter(), False
        if state.stop_signal or out_of_time:
            break
    return state


def expensive(metric: str) -> bool:
    """A metric's declared ``expensive`` (its factory's attribute): left out of periodic evals."""
    return bool(getattr(get_registry().entries["metrics"][metric].factory, "expensive", False))


def _count(t: Trainer, state: Loop, applied: bool, logs: dict[str, Any]) -> None:
    """Add a step to the log window; too many skipped in a row (non-finite loss or gradient) stop
    the run, pointing at the newest checkpoint."""
    state.window_steps += 1
    if applied:
        for key, value in logs.items():
            state.window[key] += value
            state.window_counts[key] += 1
        state.consecutive_skips = 0
        return
    state.skipped += 1
    state.consecutive_skips += 1
    if state.consecutive_skips > t.recipe.optim.max_skipped_steps:
        newest = checkpoint.latest_tag(t.ckpt_dir)
        where = f"the newest complete checkpoint is {t.ckpt_dir / newest}" if newest else "no checkpoint was saved yet"
        raise TrainingError(
            f"{state.consecutive_skips} consecutive steps had a non-finite loss or gradient "
            f"(last at step {state.step}); {where}. Lower [optim] lr or check the data, then "
            f"resume with --resume {t.out_dir} --set optim.lr=..."
        )


def _log_window(t: Trainer, state: Loop) -> None:
    """One ``train`` record: the window's mean logs, learning rate, throughput, skipped steps."""
    elapsed = time.perf_counter() - state.t_window
    # the window's device values (see ngkit.engine.step) reach the host here, once per log interval
    # each key over the applied steps that reported it (all of them, but for logs measured only
    # on the steps whose logs are read: ngkit.components.LOGS_READ)
    means = host_floats({k: v / max(1, state.window_counts[k]) for k, v in state.window.items()})
    record = {"kind": "train", "step": state.step, **means}
    record["lr"] = t.engine.get_lr()[0]
    record["images_per_s"] = state.window_steps * t.facts["global_batch"] / max(elapsed, 1e-9)
    record["skipped_steps"] = state.skipped
    if t.main:
        t.writer.write(record)
        get_plugin_manager().hook.on_step_end(run=t.run, step=state.step, logs=record)
    t.progress.update(state.step, record)
    state.window.clear()
    state.window_counts.clear()
    state.window_steps, state.t_window = 0, time.perf_counter()


def _eval_record(step: int, result: EvalResult) -> dict[str, Any]:
    return {"kind": "eval", "step": step, **{f"test/{k}": v for k, v in result.values.items()}}


def run_eval(t: Trainer, step: int, names: list[str], num_images: int) -> EvalResult:
    """Fresh metrics over the first ``num_images`` test images, sharded over the ranks."""
    metrics = build_metrics(names, t.recipe.eval.options)
    with weights_for_eval(t.ema, t.method):  # [run] ema: evaluated with the averaged weights
        return evaluate(
            t.method, t.built.dataset, metrics, num_images=num_images, batch_size=t.recipe.eval.batch_size,
            beta=t.built.beta(step), device=t.dist.device, rank=t.dist.rank, world_size=t.dist.world_size,
            keep=t.recipe.run.grid_images, dtype=t.dtype, seed=t.recipe.run.seed,
        )


def save(t: Trainer, step: int) -> Path:
    """A checkpoint of every rank (weights, optimiser; each rank's data position, generators and
    the method's per-rank state, :mod:`ngkit.engine.rank_state`) at ``step``."""
    dist = t.dist
    epochs = torch.tensor([float(t.batches.position.epoch)])
    torch.distributed.all_reduce(epochs, op=torch.distributed.ReduceOp.MAX)
    state = {"step": step, "ngkit_version": __version__, "recipe": t.resolved,
             "world_size": dist.world_size, "max_epoch": int(epochs.item())}
    if t.ema is not None:  # [run] ema: checkpointed in the client state
        state[EMA_KEY] = t.ema.state_dict()
    state[LOSSES_KEY] = losses_state(t.losses)  # [[loss]]: their own training state
    own = {"data": t.batches.state(), "rng": rng_state(), "unreadable": sorted(t.batches.unreadable),
           "method": rank_state.collect(t.method)}
    path = checkpoint.save(t.engine, t.ckpt_dir, step, state, own, dist.rank, dist.world_size,
                           keep=t.recipe.run.keep_checkpoints)
    if t.main:
        get_plugin_manager().hook.on_checkpoint(run=t.run, step=step, path=path)
    return path


def stopped(t: Trainer, state: Loop) -> None:
    """Raise :class:`RunStopped` after a stop signal (the loop saved a checkpoint first)."""
    if t.main:
        t.writer.close()
    raise RunStopped(
        f"stopped by {state.stop_signal} after step {state.step}; checkpoint saved in "
        f"{t.ckpt_dir / checkpoint.step_tag(state.step)}. Continue with: ngkit run --resume {t.out_dir}",
        exit_code=130 if state.stop_signal == "SIGINT" else 0,
    )


def finish(t: Trainer, state: Loop) -> TrainResult:
    """The last checkpoint, the full evaluation, pictures and summary.json."""
    train_seconds = time.perf_counter() - state.t_start
    step = state.step
    if state.saved_step != step:
        save(t, step)
    result = run_eval(t, step, t.recipe.eval.metrics, t.recipe.eval.num_images)
    summary = {
        "recipe": t.trained,
        "step": step,
        "train_seconds": train_seconds,
        "stopped_by": "time" if step < t.recipe.run.steps else "steps",
        "skipped_steps": state.skipped,
        "unreadable_images": len(t.batches.unreadable),
        "beta": t.built.beta(step),
        "metrics": result.values,
        "protocol": result.protocols,
        "eval_images": result.num_images,
        **t.facts,
        "versions": {"ngkit": __version__, "torch": torch.__version__},
    }
    records: list[dict[str, Any]] = []
    if t.main:
        t.writer.write(_eval_record(step, result))
        t.writer.close()
        save_grid(t.out_dir / "reconstructions.png", result.images, result.reconstructions)
        records = read_jsonl(t.out_dir / "metrics.jsonl")
        save_curves(t.out_dir / "curves.png", records, f"{t.out_dir.name}: {t.trained}")
        checkpoint.write_text_atomic(t.out_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
        get_plugin_manager().hook.on_train_end(run=t.run, summary=summary)
    t.progress.finish(summary, t.out_dir)
    return TrainResult(out_dir=t.out_dir, summary=summary, main=t.main, records=records)
