"""Public building blocks for method plugins (part of ngkit's plugin API, see
docs/writing-a-plugin.md "What a plugin may import").

- :class:`CategoricalVAE`: the base of every method whose encoder is a categorical q(z|x)
  (DAPS, Gumbel, REINFORCE, PPO), with the evaluation helpers they share;
- :class:`DeadCodeSplitter`: re-seeds unused codes from used ones;
- :class:`EncoderTrustRegion`, :func:`project_step` and :func:`token_kl`: the encoder's real step,
  measured and bounded (a penalty or a projection);
- :func:`reward_scale`: what a β schedule's β is multiplied by (its ``relative`` option);
- :func:`marginal_kl`: KL(q̄ ‖ uniform) of the codes' marginal, the part of the prior term that is code usage.
"""

from __future__ import annotations

from ngkit.methods.beta import reward_scale
from ngkit.methods.categorical_vae import CategoricalVAE, DeadCodeSplitter
from ngkit.methods.marginal import marginal_kl
from ngkit.methods.trust_region import EncoderTrustRegion, StepProjection, project_step, token_kl

__all__ = ["CategoricalVAE", "DeadCodeSplitter", "EncoderTrustRegion", "StepProjection", "marginal_kl", "project_step", "reward_scale",
           "token_kl"]
