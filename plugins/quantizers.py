"""The quantizer interface of the VQ-VAE and FSQ baselines: continuous features -> discrete codes.
The quantizers themselves (``vq``, ``fsq``, ``rvq``, ``lfq``...) come from vector-quantize-pytorch
through plugins/vq_lib.py; ngkit's own VQ and FSQ were replaced by them (docs/results.md, issue 22).

Interface every quantizer follows (the ``"vqvae"``/``"fsq"`` methods rely on nothing else):

- ``dim``: the size of the feature vector it quantizes (one per token);
- ``forward(h [B, L, dim]) -> (quantized [B, L, dim], codes [B, L] long, aux_loss, logs)``:
  ``quantized`` carries a straight-through gradient to ``h``; ``aux_loss`` is a scalar in nats
  per image (added to -log p(x|z)); ``logs`` maps names to detached scalar tensors (the method
  copies all its logs to the host at once);
- ``codes_to_vectors(codes [B, L]) -> [B, L, dim]``: what ``forward`` returns for those codes;
- ``after_step() -> logs``: updates that are not gradient steps (EMA codebook, dead-code
  restarts), called once per taken optimiser step.

Factories take the context argument ``latent`` (its ``codes`` is the vocabulary size V). A
third-party quantizer subclasses :class:`Quantizer` and registers through ``register_quantizers``.
"""

from __future__ import annotations

from torch import Tensor, nn

Quantized = tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]
"""``(quantized [B, L, dim], codes [B, L], aux_loss, logs)``, what ``Quantizer.forward`` returns."""


class Quantizer(nn.Module):
    """Base class documenting the interface above."""

    dim: int

    def forward(self, h: Tensor) -> Quantized:  # type: ignore[override]
        raise NotImplementedError

    def codes_to_vectors(self, codes: Tensor) -> Tensor:
        raise NotImplementedError

    def after_step(self) -> dict[str, float]:
        return {}
