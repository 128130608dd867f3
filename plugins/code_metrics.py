"""Built-in metrics "usage" and "beta-elbo": what the discrete code carries.

"usage" reads the codes of every evaluated image: how many of the V codes are used at all, the
perplexity of the code marginal, and the bits an image costs at a fixed rate (L log2 V).
"beta-elbo" averages the method's own per-image β-ELBO, where the method defines one.
Counts and sums are summed over ranks in ``compute``; every rank must have evaluated at least
one batch (the eval loop shards the held-out set across ranks).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ngkit import hookimpl, versions
from ngkit.components import EvalBatch, LatentSpec, Register
from ngkit.distributed import sum_over_ranks
from ngkit.errors import NgkitError

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")


class CodeUsageMetric:
    """Code usage over all tokens of all evaluated images.

    - ``code_usage``: fraction of the V codes that occur at least once;
    - ``dead_codes``: V minus the number of codes that occur;
    - ``code_perplexity``: exp(H) of the marginal code histogram, H in nats (1 to V; V when
      every code is equally frequent);
    - ``bits_per_image``: L log2 V, the size of an image's code (a property of the latent grid).
    """

    def __init__(self) -> None:
        self._histogram: Tensor | None = None  # [V] int64 counts, allocated at the first batch
        self._latent: LatentSpec | None = None
        self._tokens = 0

    def update(self, batch: EvalBatch) -> None:
        latent, codes = batch.latent, batch.codes
        if codes.dim() != 2 or codes.shape[1] != latent.tokens:
            raise NgkitError(f"usage: expected codes [B, {latent.tokens}]; got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= latent.codes):
            raise NgkitError(
                f"usage: codes must lie in [0, {latent.codes}); got {int(codes.min())}..{int(codes.max())}"
            )
        if self._histogram is None:
            self._histogram = torch.zeros(latent.codes, dtype=torch.int64, device=codes.device)
            self._latent = latent
        elif latent != self._latent:
            raise NgkitError(f"usage: the latent changed between batches ({self._latent} then {latent})")
        self._histogram += torch.bincount(codes.flatten(), minlength=latent.codes)

    def compute(self) -> dict[str, float]:
        if self._histogram is None or self._latent is None:
            raise NgkitError("usage: no images were evaluated")
        histogram = sum_over_ranks(self._histogram).double()
        self._tokens = int(histogram.sum())
        p = histogram[histogram > 0] / self._tokens
        entropy = float(-(p * p.log()).sum())
        used = int((histogram > 0).sum())
        codes = self._latent.codes
        return {
            "code_usage": used / codes,
            "dead_codes": float(codes - used),
            "code_perplexity": math.exp(entropy),
            "bits_per_image": self._latent.bits_per_image,
        }

    def protocol(self) -> dict[str, Any]:
        latent = self._latent
        return {
            "metric": "usage",
            "definition": (
                "histogram of the deterministic codes (Method.encode) over all tokens of all "
                "evaluated images; usage = used codes / V, perplexity = exp(entropy in nats), "
                "bits per image = L log2 V"
            ),
            "tokens": self._tokens,
            "latent": {"grid": list(latent.grid), "codes": latent.codes} if latent else None,
            "versions": versions(),
        }


class BetaElboMetric:
    """Mean per-image β-ELBO, E_q[log p(x|z)] - β KL(q(z|x) || uniform), from the method.

    ``beta_elbo`` in nats per image; ``beta_elbo_bpd`` = -β-ELBO / (C H W ln 2) in bits per
    dimension. Methods without a β-ELBO (``EvalBatch.beta_elbo`` is None) get no numbers.
    """

    def __init__(self) -> None:
        self._defined: bool | None = None  # None until the first batch
        self._totals: Tensor | None = None  # float64 (sum of β-ELBO, images)
        self._dims = 0  # C * H * W
        self._images = 0

    def update(self, batch: EvalBatch) -> None:
        defined = batch.beta_elbo is not None
        if self._defined is not None and defined != self._defined:
            raise NgkitError("beta-elbo: the method returned a β-ELBO for some batches but not for others")
        self._defined = defined
        if batch.beta_elbo is None:
            return
        values = batch.beta_elbo.detach().double()
        if values.shape != (batch.images.shape[0],):
            raise NgkitError(
                f"beta-elbo: expected one value per image [{batch.images.shape[0]}]; got {tuple(values.shape)}"
            )
        self._dims = batch.images[0].numel()
        if self._totals is None:
            self._totals = torch.zeros(2, dtype=torch.float64, device=values.device)
        self._totals += torch.stack([values.sum(), values.new_tensor(values.numel())])

    def compute(self) -> dict[str, float]:
        if self._totals is None:
            return {}
        total, images = sum_over_ranks(self._totals).tolist()
        self._images = int(images)
        nats = total / images
        return {"beta_elbo": nats, "beta_elbo_bpd": -nats / (self._dims * math.log(2))}

    def protocol(self) -> dict[str, Any]:
        if not self._defined:
            return {"metric": "beta-elbo", "definition": "not defined for this method"}
        return {
            "metric": "beta-elbo",
            "definition": (
                "mean over images of E_q[log p(x|z)] - beta * KL(q(z|x) || uniform) as the method "
                "computes it at the beta the evaluation passes, in nats per image; bpd = "
                "-beta_elbo / (C*H*W ln 2). For continuous decoders log p is a density (in the "
                "decoder's pixel units), so bpd is not the discrete 8-bit bits per dimension"
            ),
            "images": self._images,
            "dimensions": self._dims,
            "versions": versions(),
        }


@hookimpl
def register_metrics(register: Register) -> None:
    register("usage", CodeUsageMetric)
    register("beta-elbo", BetaElboMetric)
