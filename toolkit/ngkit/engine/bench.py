"""What one training step costs: the engine's own step (:func:`ngkit.engine.step.train_step`)
timed by phase, against its compute floor and against VQ-VAE on the same model.

The *floor* of a method that draws K codes per image (DAPS, DAPS-NA, REINFORCE, PPO) is the
model work no implementation of the update can skip: the decoder forward + backward on all K*B
decoded images, one teacher-forced encoder pass with gradient, and (autoregressive encoder) the
drawing of the K sequences, each timed alone on the same batch. ``ngkit bench`` prints it;
docs/performance.md holds measured tables.
"""

from __future__ import annotations

import resource
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ngkit.components import LOGS_READ, Decoder, Encoder
from ngkit.data import TrainBatches
from ngkit.engine.build import build
from ngkit.engine.deepspeed_engine import DTYPES, denormal_mode, make_engine
from ngkit.engine.distributed import init_distributed, pick_device, set_accelerator_env
from ngkit.engine.step import PhaseTimer, StepPlan, instrument, logs_read_at, train_step
from ngkit.engine.seeding import seed_everything
from ngkit.recipe import Recipe


@dataclass
class MethodTiming:
    """Medians over the timed steps (after the warm-up), in milliseconds."""

    method: str
    step_ms: float
    phases_ms: dict[str, float]  # exclusive: a phase inside another is not counted twice
    images_per_s: float
    samples: int | None  # K codes drawn per image, for methods that draw them
    floor_ms: float | None = None
    floor_parts_ms: dict[str, float] = field(default_factory=dict)

    @property
    def step_over_floor(self) -> float | None:
        return self.step_ms / self.floor_ms if self.floor_ms else None


@dataclass
class BenchReport:
    recipe: str
    device: str
    threads: int
    batch: int  # images per step on this rank (batch_size x accumulate)
    steps: int
    warmup: int
    clock: str  # "wall" or "cpu" (this process's CPU time)
    timing: MethodTiming
    baseline: MethodTiming | None  # VQ-VAE on the same encoder and decoder
    peak_rss_mb: float  # the process's, since it started
    cuda_max_allocated_mb: float | None

    @property
    def ratio_to_baseline(self) -> float | None:
        return self.timing.step_ms / self.baseline.step_ms if self.baseline else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["timing"]["step_over_floor"] = self.timing.step_over_floor
        out["ratio_to_baseline"] = self.ratio_to_baseline
        return out


def _median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def _timed(fn: Any, repeats: int, timer: PhaseTimer) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
    times = []
    for i in range(repeats + 1):
        start = timer.now()
        fn()
        if i:
            times.append(timer.now() - start)
    return statistics.median(times)


def floor_parts(
    encoder: Encoder, decoder: Decoder, samples: int, x: torch.Tensor, repeats: int, timer: PhaseTimer,
    post_step_pass: bool = False,
) -> dict[str, float]:
    """Median seconds of each part of the floor on batch ``x`` with K = ``samples``.
    ``post_step_pass``: the method's update itself needs the encoder's distribution after the
    optimiser step (DAPS's projection into its trust region, ``trust_region_mode = "project"``):
    one more gradient-free teacher-forced pass on the step's codes (one of the K samples when
    the encoder is factorised: its logits do not depend on the codes)."""
    z, _ = encoder.sample(x, samples)
    x_k = x.expand(samples, *x.shape).flatten(0, 1)

    def decoder_pass() -> None:
        decoder.log_prob(x_k, decoder(decoder.embed(z.flatten(0, 1)))).sum().backward()

    def teacher_forced() -> None:
        encoder.log_prob(x, z).logq.sum().backward()

    parts = {
        "decoder fwd+bwd (K*B images)": _timed(decoder_pass, repeats, timer),
        "teacher-forced pass fwd+bwd": _timed(teacher_forced, repeats, timer),
    }
    if encoder.autoregressive:
        parts["sampling K sequences"] = _timed(lambda: encoder.sample(x, samples), repeats, timer)
    if post_step_pass:
        z_kl = z if encoder.autoregressive else z[:1]

        @torch.no_grad()
        def post_step() -> None:
            encoder.log_prob(x, z_kl)

        parts["post-step pass (projection)"] = _timed(post_step, repeats, timer)
    encoder.zero_grad(set_to_none=True)
    decoder.zero_grad(set_to_none=True)
    return parts


def time_method(
    recipe: Recipe, steps: int, warmup: int, device: torch.device, floor: bool, clock: str
) -> MethodTiming:
    """Build ``recipe``'s method in a DeepSpeed engine and time ``steps`` steps after ``warmup``."""
    dtype = DTYPES[recipe.distributed.precision]
    seed_everything(recipe.run.seed)
    built = build(recipe)
    engine = make_engine(built.method.to(device), recipe)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    batches = TrainBatches(built.dataset, recipe.data.batch_size, recipe.run.seed, rank, world, recipe.data.workers)
    plan = StepPlan.of(engine, recipe, device, dtype)
    timer = PhaseTimer(device, clock)
    instrument(engine.module, engine.ngkit_optimizer, timer)
    totals, phases, images = [], [], 0
    with denormal_mode(recipe, device):
        for step in range(1, warmup + steps + 1):
            timer.seconds.clear()
            # as the training loop runs it: logs measured only when read are measured at log steps
            read = LOGS_READ.set(logs_read_at(step, recipe.run.log_every, warmup + steps))
            start = timer.now()
            try:
                result = train_step(engine, batches, step, plan, timer=timer)
            finally:
                elapsed = timer.now() - start
                LOGS_READ.reset(read)
            if step > warmup:
                totals.append(elapsed)
                phases.append(dict(timer.seconds))
                images += result.images
    names = sorted({n for p in phases for n in p}, key=lambda n: -sum(p.get(n, 0.0) for p in phases))
    timing = MethodTiming(
        method=recipe.method.name,
        step_ms=_median_ms(totals),
        phases_ms={n: _median_ms([p.get(n, 0.0) for p in phases]) for n in names},
        images_per_s=images / sum(totals),
        samples=getattr(engine.module, "samples", None),
    )
    encoder, decoder = getattr(engine.module, "encoder", None), getattr(engine.module, "decoder", None)
    if floor and isinstance(encoder, Encoder) and isinstance(decoder, Decoder) and timing.samples:
        x = next(batches).to(device, dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            post_step = bool(getattr(engine.module, "post_step_pass", False))  # declared by the method
            parts = floor_parts(encoder, decoder, timing.samples, x, steps, timer, post_step)
        timing.floor_parts_ms = {n: 1e3 * s for n, s in parts.items()}
        timing.floor_ms = sum(timing.floor_parts_ms.values())
    return timing


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def bench(
    recipe: Recipe, name: str, steps: int, warmup: int, baseline: Recipe | None, clock: str = "wall"
) -> BenchReport:
    """Time ``recipe``'s training step (and ``baseline``'s, in the same process) on its device,
    by wall time or this process's CPU time (``clock``, see :class:`PhaseTimer`)."""
    device = pick_device(recipe.run.device)
    set_accelerator_env(device)
    init_distributed(device, recipe.distributed.backend)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = time_method(recipe, steps, warmup, device, True, clock)
    base = time_method(baseline, steps, warmup, device, False, clock) if baseline else None
    return BenchReport(
        recipe=name,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        threads=torch.get_num_threads(),
        batch=recipe.data.batch_size * recipe.optim.accumulate,
        steps=steps,
        warmup=warmup,
        clock=clock,
        timing=timing,
        baseline=base,
        peak_rss_mb=peak_rss_mb(),
        cuda_max_allocated_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    )
