"""VQ-VAE and FSQ baselines: a deterministic encoder whose features are quantized, trained
end to end through the quantizer's straight-through gradient (no posterior, no β)."""

from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor, nn

from ngkit import hookimpl
from ngkit.components import Decoder, Encoder, LatentSpec, Method, Quantizer, Ref, Register, StepOutput, host_logs

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")



class QuantizedAutoencoder(Method):
    """encoder.features -> linear to ``quantizer.dim`` -> quantizer (any object with the
    interface of :class:`ngkit.components.Quantizer`) -> linear to the decoder's embedding size ->
    decoder. Loss: -mean log p(x|z_q) + the quantizer's auxiliary loss (nats per image). The
    decoder's own code embedding is not used: codes here are continuous vectors."""

    def __init__(
        self,
        *,
        encoder: Encoder,
        decoder: Decoder,
        latent: LatentSpec,
        quantizer: Annotated[Quantizer, Ref("quantizers")] = "vq",  # type: ignore[assignment]
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.quantizer = quantizer
        self.latent = latent
        self.to_code = nn.Linear(encoder.feature_dim, quantizer.dim)
        self.from_code = nn.Linear(quantizer.dim, decoder.embed_dim)

    def forward(self, x: Tensor, step: int) -> StepOutput:  # type: ignore[override]
        quantized, codes, aux, logs = self.quantizer(self.to_code(self.encoder.features(x)))
        logp = self.decoder.log_prob(x, self.decoder(self.from_code(quantized))).mean()
        loss = -logp + aux
        used = torch.zeros(self.latent.codes, device=codes.device).index_fill_(0, codes.flatten(), 1)
        # codes_used: fraction of the V codes that occur in this batch
        return StepOutput(loss, host_logs({"loss": loss, "logp": logp, "codes_used": used.mean(), **logs}))

    def after_step(self, step: int) -> dict[str, float]:
        return self.quantizer.after_step()

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return self.quantizer(self.to_code(self.encoder.features(x)))[1]

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.decoder.mean(self.decoder(self.from_code(self.quantizer.codes_to_vectors(z))))


class FSQAutoencoder(QuantizedAutoencoder):
    """The same model with FSQ as the default quantizer, so ``[method] name = "fsq"`` needs nothing else."""

    def __init__(
        self,
        *,
        encoder: Encoder,
        decoder: Decoder,
        latent: LatentSpec,
        quantizer: Annotated[Quantizer, Ref("quantizers")] = "fsq",  # type: ignore[assignment]
    ) -> None:
        super().__init__(encoder=encoder, decoder=decoder, latent=latent, quantizer=quantizer)


@hookimpl
def register_methods(register: Register) -> None:
    register("vqvae", QuantizedAutoencoder)
    register("fsq", FSQAutoencoder)
