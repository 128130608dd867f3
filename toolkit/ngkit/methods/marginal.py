"""The aggregate posterior's distance from the prior: what a code-usage collapse is.

With a uniform prior u over the C codes, the prior term of the β-ELBO splits in two (Hoffman and
Johnson's ELBO surgery, the decomposition β-TCVAE builds on):

    E_x KL(q(z|x) ‖ u) = I_q(x; z) + KL(q̄ ‖ u),     q̄(z) = E_x q(z|x),

the information the codes carry about the image and the distance of the codes' marginal from
uniform. The β-ELBO weighs both alike, so the only way it has to keep codes in use (the second
term) also pays to forget the image (the first). :func:`marginal_kl` measures the second alone,
so that a method can weigh it on its own (DAPS's ``marginal_kl`` option, docs/daps.md "Keeping
codes in use"); LFQ/MAGVIT-v2's "codebook entropy" loss is the same quantity up to log C.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def marginal_kl(log_probs: Tensor) -> Tensor:
    """KL(q̄ ‖ uniform) in nats, with q̄ the mean of ``exp(log_probs)`` over every leading dim.

    ``log_probs [..., C]``: normalised per-token log-probabilities (an encoder's ``logits``), e.g.
    ``[K, B, L, C]``; q̄ pools images, tokens and samples, the distribution of one token's code
    that code usage and perplexity measure. Differentiable; computed in float32 or wider.
    0 when q̄ is uniform, log C when every token puts all its mass on one code.
    """
    codes = log_probs.shape[-1]
    wide = log_probs.to(torch.promote_types(log_probs.dtype, torch.float32))
    probs = wide.exp().reshape(-1, codes).mean(0)
    return (probs * (probs.clamp_min(torch.finfo(probs.dtype).tiny).log() + math.log(codes))).sum()
