"""A trained prior run read back for sampling: its recipe, the frozen tokenizer it names, and the
prior's weights from the latest checkpoint (no DeepSpeed, no process group)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ngkit.errors import NgkitError, WeightsError
from ngkit.priors.base import Prior
from ngkit.priors.recipe import PriorRecipe, is_prior_recipe, load_prior_recipe
from ngkit.priors.trainer import build_prior
from ngkit.tokenizer import Tokenizer, load


@dataclass
class PriorRun:
    run_dir: Path
    recipe: PriorRecipe
    prior: Prior
    tokenizer: Tokenizer
    step: int

    @torch.no_grad()
    def sample(self, labels: Tensor, *, guidance: float = 1.0, seed: int = 0, batch_size: int = 256) -> tuple[Tensor, Tensor]:
        """Codes ``[N, L]`` and images ``[N, C, H, W]`` in [0, 1] for labels ``[N]`` (``classes``
        = unconditional), the same for the same seed."""
        generator = torch.Generator().manual_seed(seed)
        codes = torch.cat([
            self.prior.sample(chunk, guidance=guidance, generator=generator)
            for chunk in labels.split(batch_size)
        ])
        images = torch.cat(list(self.tokenizer.decode_batch(codes, batch_size=batch_size)))
        return codes, images


def load_prior_run(target: Path) -> PriorRun:
    """A prior run directory (or one of its checkpoints) ready to sample."""
    from ngkit.engine.load import locate, read_model_state

    run_dir, tag = locate(target)
    if not is_prior_recipe(run_dir / "recipe.toml"):
        raise NgkitError(f"{run_dir} is a tokenizer run; sampling needs a run of 'ngkit prior train'")
    recipe = load_prior_recipe(run_dir / "recipe.toml")
    if recipe.prior.classes is None:
        raise NgkitError(f"{run_dir / 'recipe.toml'} has no [prior] classes; was it written by 'ngkit prior train'?")
    tokenizer = load(recipe.prior.tokenizer)
    with torch.random.fork_rng(devices=[]):  # building draws initial weights; leave the caller's RNG be
        prior = build_prior(recipe.prior.table(), tokenizer, recipe.prior.classes)
    module, client = read_model_state(run_dir, tag)
    state = {key.removeprefix("prior."): value for key, value in module.items() if key.startswith("prior.")}
    missing, unexpected = prior.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(
            f"{run_dir / 'checkpoints' / tag} does not fit the prior its recipe builds (missing: "
            f"{', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'})"
        )
    return PriorRun(run_dir, recipe, prior.float().eval(), tokenizer, int(client.get("step", 0)))
