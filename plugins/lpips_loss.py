"""LPIPS (Zhang et al. 2018, v0.1, VGG-16 trunk) in plain PyTorch, as a ``[[loss]]``.

    [[loss]]
    name = "lpips"
    weight = 100.0

The distance of the reference implementation (the ``lpips`` package, ``LPIPS(net="vgg")``,
inputs in [0, 1] with ``normalize=True``): images scaled to [-1, 1], shifted and scaled per
channel (:data:`SHIFT`, :data:`SCALE`), VGG-16 features after relu1_2, relu2_2, relu3_3,
relu4_3 and relu5_3, each unit-normalised over channels (eps 1e-10), squared differences
weighted per channel by the 1x1 convolutions ``lin0..lin4`` (no bias), averaged over space and
summed over the five layers. The trunk is torchvision's ``vgg16().features`` module for module
(``net.features.N``), so torchvision's ImageNet file loads as it is; the heads are the
``lpips`` package's ``weights/v0.1/vgg.pth`` (``linK.model.1.weight``), shipped here converted
to safetensors (``lpips_vgg_heads.safetensors``; both files' SHA-256 pinned below; LPIPS is
BSD-2-Clause, github.com/richzhang/PerceptualSimilarity).

The VGG-16 weights (528 MiB) are found like the FID Inception weights (``ngkit.weights``: the
``vgg16_weights`` option, ``NGKIT_VGG16_WEIGHTS``, or ``ngkit weights add FILE --name vgg16``).
``pretrained = false`` uses a fixed random trunk instead: the mechanics run, the numbers mean
nothing perceptual. Images smaller than 32 pixels a side are upsampled to 32 (bilinear) so the
fifth layer has a pixel; grey images are repeated to three channels.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngkit import hookimpl
from ngkit.components import Register
from ngkit.errors import WeightsError
from ngkit.weights import find_weights, load_weights, sha256_of

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")

# torchvision's VGG-16 ("D"): channels of each 3x3 convolution (each followed by a ReLU), M = 2x2 max pool
VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
TAPS = (3, 8, 15, 22, 29)  # indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)  # lpips ScalingLayer, for inputs in [-1, 1]
SCALE = (0.458, 0.448, 0.450)
MIN_SIDE = 32  # 16 is the least the four pools before relu5_3 allow; 32 leaves it 2x2
HEADS = Path(__file__).with_name("lpips_vgg_heads.safetensors")
HEADS_SHA256 = "1c26fea74dc59192dd6656c0b508d5a15137449fd8eea8d4e142442ce18dde29"
# lpips 0.1.4's lpips/weights/v0.1/vgg.pth, the file the copy above was converted from
SOURCE_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"


def vgg16_features() -> nn.Sequential:
    """``torchvision.models.vgg16().features``, layer for layer (31 modules)."""
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = int(item)
    return nn.Sequential(*layers)


class VGG16Trunk(nn.Module):
    """The trunk, named as torchvision's model (``features.N.weight``) so its file loads."""

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg16_features()

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = []
        for i, layer in enumerate(self.features[: TAPS[-1] + 1]):
            x = layer(x)
            if i in TAPS:
                taps.append(x)
        return taps


class LinearHead(nn.Module):
    """lpips' ``NetLinLayer``: dropout (inactive in eval), then a 1x1 convolution to one channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """The LPIPS distance: ``net`` (VGG-16 trunk) and heads ``lin0..lin4``, as the reference names them."""

    def __init__(self) -> None:
        super().__init__()
        self.net = VGG16Trunk()
        for k, channels in enumerate(CHANNELS):
            self.add_module(f"lin{k}", LinearHead(channels))
        self.register_buffer("input_shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def _input(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if min(x.shape[-2:]) < MIN_SIDE:
            factor = MIN_SIDE / min(x.shape[-2:])
            size = (round(x.shape[-2] * factor), round(x.shape[-1] * factor))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return ((2 * x - 1) - self.input_shift) / self.input_scale

    def forward(self, images: Tensor, reconstructions: Tensor) -> Tensor:
        """Distance per image ``[N]`` between images ``[N, C, H, W]`` in [0, 1]."""
        total = images.new_zeros(images.shape[0])
        for k, (a, b) in enumerate(zip(self.net(self._input(images)), self.net(self._input(reconstructions)))):
            a = a / (a.square().sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.square().sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{k}")((a - b).square()).mean((1, 2, 3))
        return total


def load_heads(model: LPIPS, path: Path = HEADS) -> None:
    """The heads from a safetensors file; the shipped copy is checked against its hash."""
    from safetensors.torch import load_file

    if path == HEADS and sha256_of(path) != HEADS_SHA256:
        raise WeightsError(f"{path}: SHA-256 is {sha256_of(path)}, expected {HEADS_SHA256}; reinstall ngkit")
    state = load_file(path)
    want = {f"lin{k}.model.1.weight" for k in range(len(CHANNELS))}
    if set(state) != want:
        raise WeightsError(f"{path}: LPIPS heads need exactly {sorted(want)}, found {sorted(state)}")
    model.load_state_dict(state, strict=False)


def lpips_loss(pretrained: bool = True, vgg16_weights: str | None = None, heads: str | None = None) -> LPIPS:
    """``[[loss]] name = "lpips"``: the VGG-16 trunk from ``vgg16_weights`` (or where ngkit.weights
    finds ``vgg16``) and the shipped heads (or ``heads``, a safetensors file); ``pretrained =
    false``: a fixed random trunk (seed 0), for trying the mechanics without the download."""
    model = LPIPS()
    if pretrained:
        load_weights("vgg16", find_weights("vgg16", vgg16_weights), model.net, ignore=("classifier.",))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for layer in model.net.features:
                if isinstance(layer, nn.Conv2d):
                    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                    nn.init.zeros_(layer.bias)
    load_heads(model, Path(heads) if heads else HEADS)
    return model.eval().requires_grad_(False)


@hookimpl
def register_losses(register: Register) -> None:
    register("lpips", lpips_loss)
