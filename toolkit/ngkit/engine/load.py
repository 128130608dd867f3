"""Loading a trained run back: its resolved recipe, components and checkpoint weights.

Two paths: :func:`load_run` rebuilds the DeepSpeed engine (evaluation inside the training
stack, needs a process group); :func:`read_model_state` reads the weights from the checkpoint
files with a weights-only ``torch.load`` alone (the tokenizer path: no DeepSpeed, no process group, except to
consolidate ZeRO-3 partitions).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ngkit.engine import checkpoint, safe_load
from ngkit.engine.build import Built, build
from ngkit.engine.deepspeed_engine import make_engine
from ngkit.errors import NgkitError, WeightsError
from ngkit.recipe import Recipe, load_recipe

# DeepSpeed's files holding the module: whole under ZeRO 0-2, placeholders under ZeRO-3.
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


@dataclass
class LoadedRun:
    run_dir: Path
    recipe: Recipe
    built: Built
    engine: Any
    tag: str
    step: int


def locate(target: Path, step: int | None = None) -> tuple[Path, str]:
    """A run directory or one of its checkpoint directories -> (run dir, checkpoint tag);
    ``step`` picks a saved step of a run directory instead of the latest."""
    if (target / "recipe.toml").exists():
        ckpt_dir = target / "checkpoints"
        if step is not None:
            tag = checkpoint.step_tag(step)
            if not (ckpt_dir / tag).is_dir():
                saved = ", ".join(sorted(p.name for p in ckpt_dir.glob("step-*") if p.is_dir())) or "none"
                raise NgkitError(f"{target} has no checkpoint for step {step} (saved: {saved})")
            return target, tag
        tag = checkpoint.latest_tag(ckpt_dir)
        if tag is None:
            saved = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
            if saved:
                raise WeightsError(
                    f"no checkpoint of {target} can be loaded; the newest, {saved[-1]}: {checkpoint.problem(saved[-1])}"
                )
            raise NgkitError(f"{target} has no checkpoints yet (no {ckpt_dir / 'latest'})")
        return target, tag
    if target.parent.name == "checkpoints" and (target.parent.parent / "recipe.toml").exists():
        if not target.is_dir():
            raise NgkitError(f"checkpoint {target} does not exist; see {target.parent} for saved steps")
        if step is not None and target.name != checkpoint.step_tag(step):
            raise NgkitError(f"{target} is the checkpoint of another step than --step {step}; pass the run directory")
        return target.parent.parent, target.name
    raise NgkitError(
        f"{target} is neither an ngkit run directory (with recipe.toml) nor a checkpoint inside one "
        f"(RUN/checkpoints/step-N)"
    )


def zero_stage(saved: dict[str, Any]) -> int:
    return int(saved.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))


def read_model_state(run_dir: Path, tag: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The method's state dict (every rank's share joined) and the client state saved with it.

    ZeRO 0-2 keep the whole module in ``mp_rank_00_model_states.pt``, read here without
    DeepSpeed. ZeRO-3 partitions the weights over the ranks' optimizer files; those are
    consolidated with ``deepspeed.utils.zero_to_fp32`` (the one case that imports DeepSpeed)."""
    ckpt = run_dir / "checkpoints" / tag
    checkpoint.verify(ckpt)  # every file listed in complete.json, with its size and SHA-256
    states = next((ckpt / name for name in MODEL_STATES if (ckpt / name).is_file()), None)
    if states is None:
        raise WeightsError(
            f"{ckpt} holds neither of DeepSpeed's {' / '.join(MODEL_STATES)}; is it a complete checkpoint?"
        )
    saved = safe_load.safe_torch_load(states, "cpu", mmap=True)
    try:
        client = {key: saved[key] for key in ("step", "ngkit_version", "ema") if key in saved}  # ema: engine/ema.py
        if zero_stage(saved) < 3:
            return dict(saved["module"]), client
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise WeightsError(f"{states} is not a DeepSpeed model-states file ({type(exc).__name__}: {exc})") from exc
    from deepspeed.utils import zero_to_fp32

    # zero_to_fp32 reads every *_states.pt of the folder (verify() has checked that complete.json
    # lists each one) with weights_only=False: its torch.load is swapped for a safe one meanwhile.
    try:
        with contextlib.redirect_stdout(io.StringIO()), safe_load.deepspeed_module_loads(zero_to_fp32):
            module = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=tag)
    except NgkitError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, IndexError, FileNotFoundError, RuntimeError) as exc:
        raise WeightsError(f"could not consolidate the ZeRO-3 checkpoint {ckpt} ({type(exc).__name__}: {exc})") from exc
    return dict(module), client


def load_run(target: Path, overrides: list[str] | None = None) -> LoadedRun:
    """Rebuild a run's method and load its weights (needs an initialised process group)."""
    run_dir, tag = locate(target)
    recipe = load_recipe(run_dir / "recipe.toml", overrides)
    built = build(recipe)
    checkpoint.verify(run_dir / "checkpoints" / tag)
    engine = make_engine(built.method, recipe)  # its checkpoint engine loads weights-only
    try:
        path, client = engine.load_checkpoint(
            str(run_dir / "checkpoints"), tag=tag, load_optimizer_states=False, load_lr_scheduler_states=False
        )
    except NgkitError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as exc:
        raise WeightsError(
            f"could not load {run_dir / 'checkpoints' / tag} into the method {run_dir / 'recipe.toml'} builds "
            f"({type(exc).__name__}: {str(exc)[:500]})"
        ) from exc
    if path is None:
        raise NgkitError(f"could not load {run_dir / 'checkpoints' / tag}: no model states found there")
    return LoadedRun(run_dir, recipe, built, engine, tag, int((client or {}).get("step", 0)))
