"""A PatchGAN adversarial loss with VQGAN's adaptive weight, as a ``[[loss]]``.

    [[loss]]
    name = "patchgan"
    weight = 0.8        # taming-transformers' disc_weight
    start = 2000        # disc_start: neither the generator term nor the discriminator before it

The discriminator is taming-transformers' ``NLayerDiscriminator`` (pix2pix's PatchGAN: 4x4
convolutions, stride 2 then 1, LeakyReLU 0.2, normal(0, 0.02) initial weights; a 256x256 image
gives 30x30 patch logits with ``layers = 3``), with batch norm always on batch statistics (no
running averages, so every rank's discriminator stays identical). The generator term per image
is ``-mean(D(x_hat))`` (hinge, as taming uses for both losses) or ``mean(softplus(-D(x_hat)))``
(non-saturating); the discriminator minimises ``0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))``
(hinge) or ``0.5 (mean softplus(-D(x)) + mean softplus(D(x_hat)))`` (non-saturating).

The adaptive weight (Esser et al. 2021, eq. 7; taming's ``calculate_adaptive_weight``) scales the
term so that its gradient at the decoder's last layer is as large as the reconstruction loss's:
``lambda = ||grad_last nll|| / (||grad_last g|| + 1e-4)``, clamped to [0, 1e4], detached; the
last layer is the decoder's last parameter with two or more dimensions. ``nll`` is the batch mean
of the negative log-likelihood so far (the decoder's, with earlier ``[[loss]]`` terms).

The discriminator has its own AdamW (``lr``, ``betas``; taming: the generator's lr, betas 0.5,
0.9) and takes one step after every applied optimiser step of the run, on the images and
reconstructions of that step's micro-batches, its gradient averaged over ranks. Its weights and
optimiser state are checkpointed with the run and resumed exactly. The adaptive weight is refused
under ZeRO-3 (the decoder's last layer is partitioned there).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngkit import hookimpl
from ngkit.components import ImageSpec, Register
from ngkit.distributed import mean_over_ranks
from ngkit.errors import NgkitError

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")


def patch_discriminator(channels: int, width: int = 64, layers: int = 3) -> nn.Sequential:
    """taming-transformers' NLayerDiscriminator (its ``main``), batch norm on batch statistics."""
    seq: list[nn.Module] = [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, layers + 1):
        prev, mult = mult, min(2**n, 8)
        stride = 2 if n < layers else 1
        seq += [nn.Conv2d(width * prev, width * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(width * mult, track_running_stats=False), nn.LeakyReLU(0.2, True)]
    seq.append(nn.Conv2d(width * mult, 1, 4, stride=1, padding=1))
    for m in seq:  # taming's weights_init
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return nn.Sequential(*seq)


def discriminator_loss(real: Tensor, fake: Tensor, kind: str) -> Tensor:
    """The discriminator's loss for patch logits of real and reconstructed images."""
    if kind == "hinge":
        return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def generator_loss(fake: Tensor, kind: str) -> Tensor:
    """Per-image generator term ``[N]`` for patch logits ``[N, 1, h, w]`` of reconstructions."""
    if kind == "hinge":
        return -fake.flatten(1).mean(1)
    return F.softplus(-fake).flatten(1).mean(1)


def adaptive_weight(nll: Tensor, g: Tensor, last_layer: Tensor, eps: float = 1e-4) -> Tensor:
    """``||d nll / d last|| / (||d g / d last|| + eps)`` clamped to [0, 1e4], detached."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + eps)).clamp(0.0, 1e4).detach()


class PatchGANLoss(nn.Module):
    """The generator term of the adversarial loss; trains its discriminator after each step."""

    def __init__(
        self, *, image: ImageSpec, loss: Literal["hinge", "non-saturating"] = "hinge", width: int = 64,
        layers: int = 3, adaptive: bool = True, lr: float = 1e-4, betas: tuple[float, float] = (0.5, 0.9),
    ) -> None:
        super().__init__()
        side = min(image.height, image.width) // 2**layers - 2  # stride-2 layers, then two 4x4 stride-1 ones
        if side < 1:
            raise ValueError(f"layers = {layers} leaves no patch of a {image.height}x{image.width} image; "
                             f"use layers <= {max(1, (min(image.height, image.width) // 3).bit_length() - 1)}")
        self.kind, self.adaptive, self.lr, self.betas = loss, adaptive, lr, tuple(betas)
        self.discriminator = patch_discriminator(image.channels, width, layers)
        self.optimizer: torch.optim.Optimizer | None = None
        self.last_layer: Tensor | None = None
        self._pending: list[tuple[Tensor, Tensor]] = []  # this step's (images, reconstructions)
        self._step = -1

    def attach(self, method: nn.Module) -> None:
        self.last_layer = [p for p in method.decoder.parameters() if p.ndim >= 2][-1]
        self.optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=self.lr, betas=self.betas,
                                           weight_decay=0.0)

    def begin_step(self, step: int) -> None:
        if step != self._step:  # a new optimiser step: what a skipped one left is dropped
            self._pending, self._step = [], step

    def forward(self, images: Tensor, reconstructions: Tensor) -> Tensor:
        self._pending.append((images.detach(), reconstructions.detach()))
        return generator_loss(self.discriminator(reconstructions), self.kind)

    def weight_factor(self, nll: Tensor, value: Tensor) -> Tensor:
        if not self.adaptive:
            return value.new_ones(())
        if hasattr(self.last_layer, "ds_id"):  # DeepSpeed ZeRO-3 keeps only a partition on each rank
            raise NgkitError('[loss] "patchgan": the adaptive weight needs the decoder\'s whole last layer, which '
                             "ZeRO stage 3 partitions; use [distributed] zero_stage <= 2, or adaptive = false")
        return adaptive_weight(nll, value, self.last_layer)

    def after_step(self, step: int) -> dict[str, Tensor]:
        pending, self._pending = self._pending, []
        if not pending:
            return {}
        self.optimizer.zero_grad(set_to_none=True)
        losses, reals, fakes = [], [], []
        for images, recon in pending:  # the step's micro-batches, their gradients averaged
            real, fake = self.discriminator(images), self.discriminator(recon)
            loss = discriminator_loss(real, fake, self.kind) / len(pending)
            loss.backward()
            losses.append(loss.detach())
            reals.append(real.detach().mean())
            fakes.append(fake.detach().mean())
        for p in self.discriminator.parameters():
            p.grad = mean_over_ranks(p.grad)
        self.optimizer.step()
        stats = torch.stack([sum(losses), torch.stack(reals).mean(), torch.stack(fakes).mean()])
        # left on the device: the training loop copies logs to the host once per log interval
        return dict(zip(("d_loss", "logits_real", "logits_fake"), mean_over_ranks(stats).unbind()))

    def training_state(self) -> dict[str, Any]:
        """The discriminator and its optimiser, for the run's checkpoint."""
        return {"discriminator": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])


@hookimpl
def register_losses(register: Register) -> None:
    register("patchgan", PatchGANLoss)
