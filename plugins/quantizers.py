"""Built-in quantizers for the VQ-VAE and FSQ baselines: continuous features -> discrete codes.

Interface every quantizer follows (:class:`ngkit.components.Quantizer`; the ``"vqvae"``/``"fsq"``
methods rely on nothing else):

- ``dim``: the size of the feature vector it quantizes (one per token);
- ``forward(h [B, L, dim]) -> (quantized [B, L, dim], codes [B, L] long, aux_loss, logs)``:
  ``quantized`` carries a straight-through gradient to ``h``; ``aux_loss`` is a scalar in nats
  per image (added to -log p(x|z)); ``logs`` maps names to detached scalar tensors (the method
  copies all its logs to the host at once);
- ``codes_to_vectors(codes [B, L]) -> [B, L, dim]``: what ``forward`` returns for those codes;
- ``after_step() -> logs``: updates that are not gradient steps (EMA codebook, dead-code
  restarts), called once per taken optimiser step.

Factories take the context argument ``latent`` (its ``codes`` is the vocabulary size V).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ngkit import hookimpl
from ngkit.components import LatentSpec, Quantized, Quantizer, Register

NGKIT_PLUGIN_API = 2  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")

LAPLACE_EPS = 1e-5  # Laplace smoothing of EMA code counts (Sonnet's VectorQuantizerEMA default)
FSQ_EPS = 1e-3  # keeps bounded values off the rounding boundary (Mentzer et al. 2023, App. A)

def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(Quantizer):
    """Nearest-neighbour codebook (van den Oord et al. 2017) with a straight-through gradient.

    Losses, summed over tokens and feature dims and averaged over images (the paper's
    ||sg(z_e) - e||^2 + beta_c ||z_e - sg(e)||^2 per latent, in the same per-image units as
    log p(x|z)). With ``ema`` the codebook is a buffer moved by exponential moving averages of
    the assigned encoder outputs (VQ-VAE paper App. A.1) and only the commitment term remains.
    With ``restart_dead`` a code unused for ``restart_after`` steps is re-initialised to a random
    encoder output of the last batch.
    """

    def __init__(
        self,
        latent: LatentSpec,
        dim: int = 64,
        commitment: float = 0.25,
        ema: bool = False,
        decay: float = 0.99,
        restart_dead: bool = False,
        restart_after: int = 100,
    ) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"vq quantizer: dim must be at least 1, got {dim}")
        if not 0 < decay < 1:
            raise ValueError(f"vq quantizer: decay must be in (0, 1), got {decay}")
        if not (commitment >= 0 and restart_after >= 1):
            raise ValueError(
                f"vq quantizer: commitment must be >= 0 and restart_after >= 1, got {commitment}, {restart_after}"
            )
        self.dim = dim
        self.codes = latent.codes
        self.commitment = commitment
        self.ema = ema
        self.decay = decay
        self.restart_dead = restart_dead
        self.restart_after = restart_after
        # U(-1/V, 1/V) as in the VQ-VAE and VQGAN code: codes start near the origin, so the
        # nearest one depends on the direction of z_e and all are used from the start (a codebook
        # at the scale of z_e lets the code nearest the data cloud take every vector).
        init = torch.empty(latent.codes, dim).uniform_(-1 / latent.codes, 1 / latent.codes)
        if ema:
            self.register_buffer("codebook", init)
            self.register_buffer("ema_count", torch.ones(latent.codes))  # assignments per code
            self.register_buffer("ema_sum", init.clone())  # sum of assigned encoder outputs
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("idle_steps", torch.zeros(latent.codes, dtype=torch.long))
        # Statistics of the batches since the last optimiser step (not checkpointed).
        self.register_buffer("step_count", torch.zeros(latent.codes), persistent=False)
        self.register_buffer("step_sum", torch.zeros(latent.codes, dim), persistent=False)
        self._recent: Tensor | None = None

    def nearest(self, flat: Tensor) -> Tensor:
        """Index of the nearest code (squared Euclidean distance) for vectors ``[N, dim]``, in
        float32 (bfloat16 would misorder close distances)."""
        flat, e = flat.float(), self.codebook.detach().float()
        dist2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)
        return dist2.argmin(1)

    def forward(self, h: Tensor) -> Quantized:  # type: ignore[override]
        flat = h.reshape(-1, self.dim)
        codes = self.nearest(flat.detach())
        e = self.codebook[codes].view_as(h)
        commit = self.commitment * (h - e.detach()).pow(2).flatten(1).sum(1).mean()
        logs = {"vq_commitment": commit.detach()}
        aux = commit
        if not self.ema:
            codebook_loss = (h.detach() - e).pow(2).flatten(1).sum(1).mean()
            logs["vq_codebook"] = codebook_loss.detach()
            aux = aux + codebook_loss
        # Only training forwards feed the EMA/usage statistics, not evaluation under no_grad.
        if self.training and torch.is_grad_enabled() and (self.ema or self.restart_dead):
            with torch.no_grad():
                self.step_count += torch.bincount(codes, minlength=self.codes).to(self.step_count)
                if self.ema:
                    self.step_sum.index_add_(0, codes, flat.detach().to(self.step_sum))
                self._recent = flat.detach()
        quantized = h + (e - h).detach()  # straight-through: forward e, gradient identity to h
        return quantized, codes.view(h.shape[:-1]), aux, logs

    def codes_to_vectors(self, codes: Tensor) -> Tensor:
        return self.codebook[codes]

    @torch.no_grad()
    def after_step(self) -> dict[str, float]:
        if not (self.ema or self.restart_dead):
            return {}
        if _distributed():  # every rank applies the same update, so codebooks stay identical
            dist.all_reduce(self.step_count)
            if self.ema:
                dist.all_reduce(self.step_sum)
        logs: dict[str, float] = {}
        if self.ema:
            self._ema_update()
        if self.restart_dead:
            self.idle_steps += 1
            self.idle_steps[self.step_count > 0] = 0
            logs["vq_restarted"] = float(self._restart(self.idle_steps >= self.restart_after))
        self.step_count.zero_()
        self.step_sum.zero_()
        return logs

    def _ema_update(self) -> None:
        self.ema_count.mul_(self.decay).add_(self.step_count, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(self.step_sum, alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + LAPLACE_EPS) / (total + self.codes * LAPLACE_EPS) * total
        self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(1))

    def _restart(self, dead: Tensor) -> int:
        """Re-initialise ``dead`` codes from rank 0's last encoder outputs; returns how many."""
        num = int(dead.sum())
        if num == 0 or self._recent is None:
            return 0
        pool = self._recent
        if len(pool) >= num:
            pick = torch.randperm(len(pool), device=pool.device)[:num]
        else:  # fewer vectors in the batch than dead codes: draw with replacement
            pick = torch.randint(len(pool), (num,), device=pool.device)
        fresh = pool[pick].to(self.codebook.dtype)
        if _distributed():
            dist.broadcast(fresh, src=0)
        self.codebook[dead] = fresh
        if self.ema:
            self.ema_count[dead] = 1.0
            self.ema_sum[dead] = fresh
        self.idle_steps[dead] = 0
        return num


def round_ste(z: Tensor) -> Tensor:
    """Round to the nearest integer, with the identity as gradient."""
    return z + (z.round() - z).detach()


class FiniteScalarQuantizer(Quantizer):
    """FSQ (Mentzer et al. 2023): each of ``len(levels)`` channels is bounded and rounded to one
    of ``levels[i]`` values, so the implicit codebook has prod(levels) codes and no parameters.
    Quantized values are normalised to [-1, 1]; code index = sum_i digit_i * prod(levels[:i])."""

    def __init__(self, latent: LatentSpec, levels: Sequence[int] = (8, 5, 5, 5)) -> None:
        super().__init__()
        levels = tuple(int(n) for n in levels)
        if math.prod(levels) != latent.codes:
            raise ValueError(
                f"fsq levels {list(levels)} give {math.prod(levels)} codes but the latent has "
                f"{latent.codes}; choose levels whose product is {latent.codes} or set "
                f"[model] codes = {math.prod(levels)}"
            )
        if min(levels) < 2:
            raise ValueError(f"fsq levels {list(levels)}: every level must be at least 2")
        self.dim = len(levels)
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32), persistent=False)
        self.register_buffer("basis", torch.cumprod(torch.tensor((1, *levels[:-1])), 0), persistent=False)

    def bound(self, z: Tensor) -> Tensor:
        """Squash channel values into (-(n-1)/2, (n-1)/2) - offset so that rounding yields exactly n
        integers: -(n-1)/2 .. (n-1)/2 for odd n, -n/2 .. n/2-1 for even n (offset 1/2).
        In float32 whatever the module's dtype: bfloat16 cannot resolve FSQ_EPS."""
        n = self.levels.float()
        half = (n - 1) * (1 - FSQ_EPS) / 2
        offset = (n % 2 == 0).float() / 2
        shift = torch.tan(offset / half)  # bound(0) ~ 0; tan as in the paper's code (atanh: NaN at n=2)
        return torch.tanh(z.float() + shift) * half - offset

    def forward(self, h: Tensor) -> Quantized:  # type: ignore[override]
        quantized = round_ste(self.bound(h)) / (self.levels.float() // 2)
        return quantized.to(h.dtype), self.vectors_to_codes(quantized.detach()), h.new_zeros(()), {}

    def vectors_to_codes(self, q: Tensor) -> Tensor:
        half_width = self.levels.float() // 2
        digits = (q.float() * half_width + half_width).round()
        # A diverged step gives NaN vectors: keep the codes in range, the NaN loss skips the step.
        digits = torch.minimum(torch.nan_to_num(digits, nan=0.0).clamp(min=0), self.levels.float() - 1).long()
        return (digits * self.basis).sum(-1)

    def codes_to_vectors(self, codes: Tensor) -> Tensor:
        digits = (codes.unsqueeze(-1) // self.basis) % self.levels.long()
        half_width = self.levels // 2
        return (digits - half_width) / half_width  # in the module's dtype


@hookimpl
def register_quantizers(register: Register) -> None:
    register("vq", VectorQuantizer)
    register("fsq", FiniteScalarQuantizer)
