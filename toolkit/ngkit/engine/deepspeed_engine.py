"""Wrapping a method in a DeepSpeed engine: config from the recipe, AdamW, learning-rate schedule.

One optimiser step = ``[optim] accumulate`` micro-batches of ``[data] batch_size`` images on each
rank, so the global batch is ``batch_size x accumulate x world_size``."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from ngkit.components import Method
from ngkit.engine import safe_load
from ngkit.engine.gradients import GuardedAdamW
from ngkit.errors import RecipeError
from ngkit.recipe import Recipe

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def deepspeed_config(recipe: Recipe) -> dict[str, Any]:
    dist, optim = recipe.distributed, recipe.optim
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": recipe.data.batch_size,
        "gradient_accumulation_steps": optim.accumulate,
        "zero_optimization": {"stage": dist.zero_stage},
        "bf16": {"enabled": dist.precision == "bf16"},
        "fp16": {"enabled": dist.precision == "fp16"},
        "gradient_clipping": optim.clip_value if optim.clip == "norm" else 0.0,
        # A plain torch AdamW: DeepSpeed's fused optimisers compile kernels for minutes.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    config.update(dist.deepspeed)
    return config


def lr_lambda(recipe: Recipe):
    """Multiplier of the base learning rate at an optimiser step: warm-up, then constant/cosine."""
    warmup, total, floor = recipe.schedule.warmup_steps, recipe.run.steps, recipe.schedule.min_lr_ratio
    cosine = recipe.schedule.lr_decay == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def param_groups(method: Method, recipe: Recipe) -> list[dict[str, Any]]:
    """Every trainable parameter in one AdamW group at ``[optim] lr``, or, with ``encoder_lr`` /
    ``decoder_lr``, the method's ``encoder`` / ``decoder`` parameters in groups of their own (the
    rest first, when there is any: the logged ``lr`` is the first group's). Schedules multiply every
    group's rate by the same factor."""
    optim = recipe.optim
    trainable = [p for p in method.parameters() if p.requires_grad]
    groups, taken = [], set()
    for part, lr in (("encoder", optim.encoder_lr), ("decoder", optim.decoder_lr)):
        if lr is None:
            continue
        module = getattr(method, part, None)
        if not isinstance(module, torch.nn.Module):  # a rate that would silently apply to nothing
            raise RecipeError("[optim]", [
                f"[optim] {part}_lr is set, but method {type(method).__name__} has no `{part}` module "
                f"whose parameters it could apply to: remove {part}_lr, or give the method an `{part}` attribute"])
        params = [p for p in module.parameters() if p.requires_grad and id(p) not in taken]
        taken.update(map(id, params))
        groups.append({"params": params, "lr": lr})
    rest = [p for p in trainable if id(p) not in taken]
    return [g for g in [{"params": rest, "lr": optim.lr}, *groups] if g["params"]]


def make_engine(method: Method, recipe: Recipe) -> Any:
    """``deepspeed.initialize`` with :class:`GuardedAdamW` over every trainable parameter."""
    import deepspeed

    optim = recipe.optim
    optimizer = GuardedAdamW(
        param_groups(method, recipe), lr=optim.lr, betas=optim.betas, eps=optim.eps,
        weight_decay=optim.weight_decay, fused=optim.fused,
    )
    engine, _, _, _ = deepspeed.initialize(
        model=method,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe)),
        config=deepspeed_config(recipe),
    )
    if torch.distributed.get_world_size() == 1 and recipe.distributed.zero_stage == 0 and engine.optimizer is optimizer:
        # One rank: averaging over ranks is the identity, and DeepSpeed's reduction would copy
        # every gradient into a flat buffer and give the parameters that got none zeros to step.
        engine.enable_backward_allreduce = False
    # What DeepSpeed's zero_grad does (the one its step calls at ZeRO 0 in fp32: grad = None for
    # every parameter), over a list made once instead of a walk of the module tree every step
    # (0.11 -> 0.02 ms).
    everything = list(engine.module.parameters())
    engine.zero_grad = lambda: _set_grads_none(everything)
    if engine.optimizer is not optimizer:  # a ZeRO or bf16 wrapper steps ours
        optimizer.outer = engine.optimizer
    engine.ngkit_optimizer = optimizer  # the training loop's handle on the non-finite guard
    safe_load.install(engine)  # load_checkpoint reads weights-only (ngkit.engine.safe_load)
    _match_norm_statistics(engine.module)
    return engine


def _set_grads_none(params: list[torch.nn.Parameter]) -> None:
    for p in params:
        p.grad = None


def _denormals_flushed() -> bool:
    """Whether the CPU treats denormal floats as zero now (a float32 denormal times one)."""
    return float(torch.tensor([1e-39]) * torch.tensor([1.0])) == 0.0


@contextlib.contextmanager
def denormal_mode(recipe: Recipe, device: torch.device) -> Iterator[None]:
    """Training on the CPU with ``[distributed] flush_denormal``: near-one-hot proxy weights leave
    gradients below 1e-38 (denormal floats), whose arithmetic takes a slow path of the processor
    (docs/performance.md). The setting is process-wide, so the caller's is restored afterwards
    (libraries such as hypothesis refuse to run with denormals flushed)."""
    if device.type != "cpu":
        yield
        return
    before = _denormals_flushed()
    torch.set_flush_denormal(recipe.distributed.flush_denormal)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def _match_norm_statistics(module: torch.nn.Module) -> None:
    """DeepSpeed's bf16/fp16 modes cast parameters, not buffers; batch norm needs its running
    statistics in its weights' dtype (other buffers, such as the step-size state, stay fp32)."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None and m.running_mean is not None:
            m.running_mean.data = m.running_mean.data.to(m.weight.dtype)
            m.running_var.data = m.running_var.data.to(m.weight.dtype)
