"""Reading checkpoint files without running code from them.

A ``.pt`` file is a pickle; unpickling one can call any Python function, so a checkpoint that
travels (a shared run folder, a downloaded tokenizer) could run a program. Every ``torch.load`` of
a run's files goes through :func:`safe_torch_load`: ``weights_only=True`` (tensors, numbers,
strings, lists, tuples, dicts) plus exactly the few plain DeepSpeed classes its optimizer files
hold (:data:`DEEPSPEED_TYPES`), allowed for that call only. DeepSpeed's own loads are routed here
by :func:`install` (its checkpoint engine) and :func:`deepspeed_module_loads` (``zero_to_fp32``).
"""

from __future__ import annotations

import contextlib
import pickle
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ngkit.errors import WeightsError

TRUST_HINT = (
    "ngkit will not execute code from checkpoints. If this is your own run written by an older "
    "ngkit, convert it once with: ngkit checkpoint convert RUN --trust"
)


def deepspeed_types() -> list[type]:
    """The non-tensor classes DeepSpeed 0.1x pickles into its optimizer files (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO 0-3, fp32 and bf16 runs):
    loss scalers (plain attribute holders), ZeRO's stage enum, a fragment's (start, numel)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class UnsafeCheckpoint(WeightsError):
    """A checkpoint file that a weights-only load refuses (it would run code or is not a checkpoint)."""


def safe_torch_load(path: str | Path, map_location: Any = None, *, mmap: bool = False, deepspeed: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``; ``deepspeed`` also allows :func:`deepspeed_types`.
    Any failure is one :class:`UnsafeCheckpoint` naming the file."""
    allowed = deepspeed_types() if deepspeed else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpoint(
            f"{path} holds Python objects that a weights-only load refuses ({first[:300]}); {TRUST_HINT}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UnsafeCheckpoint(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:300]}); it is "
            f"damaged or was not written by ngkit: move the checkpoint aside"
        ) from exc


def _deepspeed_load(path: str, map_location: Any = None) -> Any:
    return safe_torch_load(path, map_location, deepspeed=True)


def install(engine: Any) -> None:
    """Route every file DeepSpeed's ``load_checkpoint`` reads (model, optimizer and ZeRO states all
    go through ``engine.checkpoint_engine.load``) through :func:`safe_torch_load`."""
    engine.checkpoint_engine.load = _deepspeed_load
    engine.ngkit_safe_loads = True


class _SafeTorch(types.ModuleType):
    """``torch`` as a module sees it, except that ``load`` is :func:`safe_torch_load`."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, map_location: Any = None, *args: Any, mmap: bool = False, **kwargs: Any) -> Any:
        return safe_torch_load(f, map_location, mmap=bool(mmap), deepspeed=True)


@contextlib.contextmanager
def deepspeed_module_loads(module: types.ModuleType) -> Iterator[None]:
    """While open, ``module``'s own ``torch.load`` calls (e.g. ``deepspeed.utils.zero_to_fp32``,
    which passes ``weights_only=False``) are safe loads; torch itself is left alone."""
    original = module.torch  # type: ignore[attr-defined]
    module.torch = _SafeTorch()  # type: ignore[attr-defined]
    try:
        yield
    finally:
        module.torch = original  # type: ignore[attr-defined]
