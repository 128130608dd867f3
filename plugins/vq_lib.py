"""The quantizers of ``vector-quantize-pytorch`` (lucidrains) behind ngkit's quantizer interface
(:class:`ngkit.components.Quantizer`), so the ``vqvae`` method trains any of them by name.

The library is an optional extra (``pip install "ngkit[quantizers]"``); it is imported only when
one of these quantizers is built, so ngkit without it still lists them and says what to install.

Conventions (docs/baselines.md, "Library quantizers"):

- **Codes.** A residual quantizer with Q levels of C codes each gives, per token, one code
  ``sum_q c_q * C**q`` (level 0 the least significant digit) in 0..V-1 with V = C**Q = ``[model]
  codes``: every method then has the same L tokens x V codes (L log2 V bits per image), and
  priors, usage metrics, export and ``ngkit encode`` see an ordinary latent. The factory refuses
  a Q for which V has no integer Q-th root.
- **Losses.** The library's auxiliary losses (commitment, codebook, entropy) are means over
  elements, balanced against a reconstruction loss that is a mean over pixels; ngkit's
  log p(x|z) is summed over pixels, so they are multiplied by ``aux_weight``, by default the
  image's pixel count (C·H·W), which keeps the library's intended balance.
- **Defaults** are the library's (tests/test_vq_lib.py checks them against its signatures),
  except where it has none: ``dim`` 64 for the codebook quantizers (ngkit's ``vq``), FSQ levels
  of 4 (and one 8) per level's C, ``num_quantizers`` 2.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from ngkit import hookimpl
from ngkit.components import ImageSpec, LatentSpec, Register
from ngkit.errors import PluginError
from ngkit.components import Quantized, Quantizer

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")

LIBRARY = "vector-quantize-pytorch"
INSTALL = 'pip install "ngkit[quantizers]"'
NAT = math.log(2)  # BinaryMapper's default KL threshold: one bit, in nats


def library(quantizer: str) -> ModuleType:
    """``vector_quantize_pytorch``, or an error naming the extra that installs it."""
    try:
        import vector_quantize_pytorch
    except ImportError as exc:
        raise PluginError(
            f'quantizer "{quantizer}" comes from the {LIBRARY} package, which is not installed; '
            f"install it with {INSTALL}"
        ) from exc
    return vector_quantize_pytorch


def per_level_codes(quantizer: str, latent: LatentSpec, num_quantizers: int) -> int:
    """C with C**Q = V: the codes of each of the Q levels of a residual quantizer."""
    if num_quantizers < 1:
        raise ValueError(f"{quantizer}: num_quantizers must be at least 1, got {num_quantizers}")
    size = round(latent.codes ** (1 / num_quantizers))
    if size < 2 or size**num_quantizers != latent.codes:
        roots = [q for q in range(1, 17) if round(latent.codes ** (1 / q)) ** q == latent.codes and latent.codes ** (1 / q) >= 1.5]
        raise ValueError(
            f"{quantizer}: num_quantizers = {num_quantizers} levels of C codes must give the latent's "
            f"{latent.codes} codes (C**{num_quantizers} = {latent.codes}), and {latent.codes} has no integer "
            f"root of that order; choose num_quantizers in {roots} or change [model] codes"
        )
    return size


def default_levels(quantizer: str, codes: int) -> list[int]:
    """FSQ levels for ``codes``: the paper's [8, 5, 5, 5] for 1000; for a power of two >= 4, 4s
    and, for an odd power, one 8 (the paper's tables use 4-8 levels per channel; the library
    refuses 2 without preserve_symmetry)."""
    if codes == 1000:
        return [8, 5, 5, 5]  # the FSQ paper's levels for ~2**10 codes
    bits = int(math.log2(codes)) if codes > 0 else 0
    if 2**bits != codes or bits < 2:
        raise ValueError(
            f"{quantizer}: no default levels for {codes} codes per level; give levels = [...] whose "
            f"product is {codes}"
        )
    return [8] * (bits % 2) + [4] * ((bits - 3 * (bits % 2)) // 2)


def check_levels(quantizer: str, levels: list[int], codes: int) -> list[int]:
    if math.prod(levels) != codes or min(levels, default=0) < 2:
        raise ValueError(
            f"{quantizer}: levels = {levels} give {math.prod(levels)} codes per level but {codes} are "
            f"needed (every level >= 2, product {codes})"
        )
    return list(levels)


def power_of_two_bits(quantizer: str, codes: int) -> int:
    bits = round(math.log2(codes))
    if 2**bits != codes:
        raise ValueError(
            f"{quantizer}: lookup-free quantization needs a power of two codes per level, got {codes}; "
            f"set [model] codes to {2 ** math.ceil(math.log2(codes))}"
        )
    return bits


class LibraryQuantizer(Quantizer):
    """One library module with ngkit's quantizer interface: ``h [B, L, dim]`` -> (quantized,
    codes [B, L], auxiliary loss in nats per image, logs).

    Also a plain module: ``quantized, codes, aux, logs = quantizer(h)``.
    """

    def __init__(
        self, name: str, module: nn.Module, *, dim: int, level_codes: int, levels: int,
        aux_weight: float, channel_first: bool = False,
    ) -> None:
        super().__init__()
        self.name = name
        self.module = module
        self.dim = dim
        self.level_codes = level_codes
        self.levels = levels
        self.aux_weight = aux_weight
        self.channel_first = channel_first  # LatentQuantize takes and gives [B, dim, L]
        self.register_buffer("radix", level_codes ** torch.arange(levels), persistent=False)

    def forward(self, h: Tensor) -> Quantized:  # type: ignore[override]
        out = self.module(h.transpose(1, 2) if self.channel_first else h)
        quantized, indices = out[0], out[1]
        if self.channel_first:
            quantized = quantized.transpose(1, 2)
        levels = self._levels(indices)
        aux = self.aux_weight * out[2].sum() if len(out) > 2 and out[2] is not None else h.new_zeros(())
        logs = {"q_aux": aux.detach().float()}
        if self.levels > 1:  # fraction of each level's C codes occurring in the batch
            for q in range(self.levels):
                used = torch.zeros(self.level_codes, device=h.device).index_fill_(0, levels[..., q].flatten(), 1)
                logs[f"q_level{q}_used"] = used.mean()
        return quantized, (levels * self.radix).sum(-1), aux, logs

    def _levels(self, indices: Tensor) -> Tensor:
        """Library indices ``[B, L]`` or ``[B, L, Q]`` -> ``[B, L, Q]`` long. A diverged step's NaN
        features give out-of-range indices: clamped, so the step's NaN loss is what skips it."""
        indices = indices.long().clamp(0, self.level_codes - 1)
        return indices.unsqueeze(-1) if indices.dim() == 2 else indices

    def split(self, codes: Tensor) -> Tensor:
        """Combined codes ``[B, L]`` -> the levels' indices ``[B, L, Q]``."""
        return (codes.unsqueeze(-1) // self.radix) % self.level_codes

    def codes_to_vectors(self, codes: Tensor) -> Tensor:
        levels = self.split(codes.long())
        if hasattr(self.module, "get_output_from_indices"):
            return self.module.get_output_from_indices(levels if self.levels > 1 else levels[..., 0])
        vectors = self.module.indices_to_codes(levels[..., 0])
        return vectors.transpose(1, 2) if self.channel_first else vectors


class BinaryMapperQuantizer(LibraryQuantizer):
    """BinaryMapper: ``dim`` = log2 V logits per token -> a sampled code (Bernoulli bits in
    training, the most likely bits in evaluation), embedded by a table ``[V, dim]`` initialised
    to the codes' ±1 bit patterns; the gradient is the library's straight-through one-hot."""

    def __init__(self, module: nn.Module, *, bits: int, aux_weight: float, temperature: float) -> None:
        super().__init__("binary-mapper", module, dim=bits, level_codes=2**bits, levels=1, aux_weight=aux_weight)
        self.temperature = temperature
        self.table = nn.Parameter(module.codes.float() * 2 - 1)

    def forward(self, h: Tensor) -> Quantized:  # type: ignore[override]
        # Bernoulli draws refuse NaN probabilities: a diverged step samples from finite logits and
        # keeps its loss NaN through the zero term, so the engine skips it.
        finite = torch.nan_to_num(h, nan=0.0, posinf=0.0, neginf=0.0)
        one_hot, indices, kl = self.module(finite, temperature=self.temperature, deterministic=not self.training,
                                           return_indices=True)
        aux = self.aux_weight * kl.sum() + 0 * (h - finite).sum()
        return one_hot @ self.table, indices.long(), aux, {"q_aux": aux.detach().float()}

    def codes_to_vectors(self, codes: Tensor) -> Tensor:
        return self.table[codes.long()]


def _weight(aux_weight: float | None, image: ImageSpec) -> float:
    return float(image.num_pixels) if aux_weight is None else aux_weight


def _build(name: str, make: Any, **kwargs: Any) -> nn.Module:
    """The library module, with its own assertion failures reported as bad options of ``name``."""
    try:
        return make(**kwargs)
    except AssertionError as exc:
        raise ValueError(f"{name}: {LIBRARY} refused the options {kwargs}: {exc}") from exc


def vector_quantize(
    latent: LatentSpec, image: ImageSpec, *, dim: int = 64, codebook_dim: int | None = None, decay: float = 0.8,
    commitment_weight: float = 1.0, kmeans_init: bool = False, kmeans_iters: int = 10, use_cosine_sim: bool = False,
    threshold_ema_dead_code: int = 0, orthogonal_reg_weight: float = 0.0, codebook_diversity_loss_weight: float = 0.0,
    rotation_trick: bool | None = None, learnable_codebook: bool | None = None, ema_update: bool | None = None,
    layernorm_after_project_in: bool = False, aux_weight: float | None = None,
) -> LibraryQuantizer:
    """VectorQuantize: nearest code of V, EMA codebook (decay 0.8) and commitment loss by default."""
    vqp = library("vq")
    module = _build("vq", vqp.VectorQuantize, dim=dim, codebook_size=latent.codes, codebook_dim=codebook_dim,
                    decay=decay, commitment_weight=commitment_weight, kmeans_init=kmeans_init,
                    kmeans_iters=kmeans_iters, use_cosine_sim=use_cosine_sim,
                    threshold_ema_dead_code=threshold_ema_dead_code, orthogonal_reg_weight=orthogonal_reg_weight,
                    codebook_diversity_loss_weight=codebook_diversity_loss_weight, rotation_trick=rotation_trick,
                    learnable_codebook=learnable_codebook, ema_update=ema_update,
                    layernorm_after_project_in=layernorm_after_project_in)
    return LibraryQuantizer("vq", module, dim=dim, level_codes=latent.codes, levels=1,
                            aux_weight=_weight(aux_weight, image))


def rvq(
    latent: LatentSpec, image: ImageSpec, *, num_quantizers: int = 2, dim: int = 64, codebook_dim: int | None = None,
    shared_codebook: bool = False, decay: float = 0.8, commitment_weight: float = 1.0, kmeans_init: bool = False,
    kmeans_iters: int = 10, use_cosine_sim: bool = False, threshold_ema_dead_code: int = 0,
    rotation_trick: bool | None = None, learnable_codebook: bool | None = None, ema_update: bool | None = None,
    aux_weight: float | None = None,
) -> LibraryQuantizer:
    """ResidualVQ (SoundStream, RQ-VAE): each level quantizes what the previous ones left."""
    vqp = library("rvq")
    size = per_level_codes("rvq", latent, num_quantizers)
    module = _build("rvq", vqp.ResidualVQ, dim=dim, num_quantizers=num_quantizers, codebook_size=size,
                    codebook_dim=codebook_dim, shared_codebook=shared_codebook, decay=decay,
                    commitment_weight=commitment_weight, kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
                    use_cosine_sim=use_cosine_sim, threshold_ema_dead_code=threshold_ema_dead_code,
                    rotation_trick=rotation_trick, learnable_codebook=learnable_codebook, ema_update=ema_update)
    return LibraryQuantizer("rvq", module, dim=dim, level_codes=size, levels=num_quantizers,
                            aux_weight=_weight(aux_weight, image))


def finite_scalar(
    latent: LatentSpec, *, levels: list[int] | None = None, dim: int | None = None,
    scale: float | None = None, projection_has_bias: bool = True, preserve_symmetry: bool = False,
    noise_dropout: float = 0.0, bound_hard_clamp: bool = False, orthogonal_rotation: bool = False,
) -> LibraryQuantizer:
    """FSQ (Mentzer et al. 2023): each channel bounded and rounded; prod(levels) = V codes, no loss."""
    vqp = library("fsq")
    levels = check_levels("fsq", levels, latent.codes) if levels is not None else default_levels("fsq", latent.codes)
    module = _build("fsq", vqp.FSQ, levels=levels, dim=dim, scale=scale, projection_has_bias=projection_has_bias,
                    preserve_symmetry=preserve_symmetry, noise_dropout=noise_dropout,
                    bound_hard_clamp=bound_hard_clamp, orthogonal_rotation=orthogonal_rotation)
    return LibraryQuantizer("fsq", module, dim=dim or len(levels), level_codes=latent.codes, levels=1, aux_weight=0.0)


def rfsq(
    latent: LatentSpec, *, num_quantizers: int = 2, levels: list[int] | None = None,
    dim: int | None = None, soft_clamp_input_value: float | None = None, bound_hard_clamp: bool = True,
) -> LibraryQuantizer:
    """ResidualFSQ: FSQ on the residual, each level's grid scaled down; prod(levels)**Q = V."""
    vqp = library("rfsq")
    size = per_level_codes("rfsq", latent, num_quantizers)
    levels = check_levels("rfsq", levels, size) if levels is not None else default_levels("rfsq", size)
    module = _build("rfsq", vqp.ResidualFSQ, levels=levels, num_quantizers=num_quantizers, dim=dim,
                    soft_clamp_input_value=soft_clamp_input_value, bound_hard_clamp=bound_hard_clamp)
    return LibraryQuantizer("rfsq", module, dim=dim or len(levels), level_codes=size, levels=num_quantizers,
                            aux_weight=0.0)


def _lfq(
    name: str, latent: LatentSpec, image: ImageSpec, *, aux_weight: float | None, dim: int | None, **options: Any
) -> LibraryQuantizer:
    vqp = library(name)
    bits = power_of_two_bits(name, latent.codes)
    module = _build(name, vqp.LFQ, dim=dim or bits, codebook_size=latent.codes, **options)
    return LibraryQuantizer(name, module, dim=dim or bits, level_codes=latent.codes, levels=1,
                            aux_weight=_weight(aux_weight, image))


def lfq(
    latent: LatentSpec, image: ImageSpec, *, dim: int | None = None, entropy_loss_weight: float = 0.1,
    commitment_loss_weight: float = 0.0, diversity_gamma: float = 1.0, frac_per_sample_entropy: float = 1.0,
    soft_clamp_input_value: float | None = None, codebook_scale: float = 1.0,
    experimental_softplus_entropy_loss: bool = False, entropy_loss_offset: float = 5.0, spherical: bool = False,
    orthogonal_rotation: bool = False, aux_weight: float | None = None,
) -> LibraryQuantizer:
    """LFQ (MAGVIT-v2): the sign of each of log2 V channels is a bit; entropy loss for usage."""
    return _lfq("lfq", latent, image, aux_weight=aux_weight, dim=dim, entropy_loss_weight=entropy_loss_weight,
                commitment_loss_weight=commitment_loss_weight, diversity_gamma=diversity_gamma,
                frac_per_sample_entropy=frac_per_sample_entropy, soft_clamp_input_value=soft_clamp_input_value,
                codebook_scale=codebook_scale, experimental_softplus_entropy_loss=experimental_softplus_entropy_loss,
                entropy_loss_offset=entropy_loss_offset, spherical=spherical, orthogonal_rotation=orthogonal_rotation)


def bsq(
    latent: LatentSpec, image: ImageSpec, *, dim: int | None = None, entropy_loss_weight: float = 0.1,
    commitment_loss_weight: float = 0.0, diversity_gamma: float = 1.0, frac_per_sample_entropy: float = 1.0,
    codebook_scale: float = 1.0, aux_weight: float | None = None,
) -> LibraryQuantizer:
    """BSQ (Zhao et al. 2024): LFQ on the unit sphere (the library's ``LFQ(spherical=True)``)."""
    return _lfq("bsq", latent, image, aux_weight=aux_weight, dim=dim, entropy_loss_weight=entropy_loss_weight,
                commitment_loss_weight=commitment_loss_weight, diversity_gamma=diversity_gamma,
                frac_per_sample_entropy=frac_per_sample_entropy, codebook_scale=codebook_scale, spherical=True)


def rlfq(
    latent: LatentSpec, image: ImageSpec, *, num_quantizers: int = 2, dim: int | None = None,
    entropy_loss_weight: float = 0.1, commitment_loss_weight: float = 0.0, diversity_gamma: float = 1.0,
    soft_clamp_input_value: float | None = None, aux_weight: float | None = None,
) -> LibraryQuantizer:
    """ResidualLFQ: LFQ on the residual, the codebook scale halved at each level."""
    vqp = library("rlfq")
    size = per_level_codes("rlfq", latent, num_quantizers)
    bits = power_of_two_bits("rlfq", size)
    module = _build("rlfq", vqp.ResidualLFQ, dim=dim or bits, num_quantizers=num_quantizers, codebook_size=size,
                    entropy_loss_weight=entropy_loss_weight, commitment_loss_weight=commitment_loss_weight,
                    diversity_gamma=diversity_gamma, soft_clamp_input_value=soft_clamp_input_value)
    return LibraryQuantizer("rlfq", module, dim=dim or bits, level_codes=size, levels=num_quantizers,
                            aux_weight=_weight(aux_weight, image))


def simvq(
    latent: LatentSpec, image: ImageSpec, *, dim: int = 64, rotation_trick: bool = True,
    input_to_quantize_commit_loss_weight: float = 0.25, commitment_weight: float = 1.0,
    frozen_codebook_dim: int | None = None, aux_weight: float | None = None,
) -> LibraryQuantizer:
    """SimVQ (Zhu et al. 2024): a frozen random codebook through a learned linear map."""
    vqp = library("simvq")
    module = _build("simvq", vqp.SimVQ, dim=dim, codebook_size=latent.codes, rotation_trick=rotation_trick,
                    input_to_quantize_commit_loss_weight=input_to_quantize_commit_loss_weight,
                    commitment_weight=commitment_weight, frozen_codebook_dim=frozen_codebook_dim)
    return LibraryQuantizer("simvq", module, dim=dim, level_codes=latent.codes, levels=1,
                            aux_weight=_weight(aux_weight, image))


def rsimvq(
    latent: LatentSpec, image: ImageSpec, *, num_quantizers: int = 2, dim: int = 64, rotation_trick: bool = True,
    input_to_quantize_commit_loss_weight: float = 0.25, commitment_weight: float = 1.0,
    aux_weight: float | None = None,
) -> LibraryQuantizer:
    """ResidualSimVQ: SimVQ on the residual."""
    vqp = library("rsimvq")
    size = per_level_codes("rsimvq", latent, num_quantizers)
    module = _build("rsimvq", vqp.ResidualSimVQ, dim=dim, num_quantizers=num_quantizers, codebook_size=size,
                    rotation_trick=rotation_trick,
                    input_to_quantize_commit_loss_weight=input_to_quantize_commit_loss_weight,
                    commitment_weight=commitment_weight)
    return LibraryQuantizer("rsimvq", module, dim=dim, level_codes=size, levels=num_quantizers,
                            aux_weight=_weight(aux_weight, image))


def latent_quant(
    latent: LatentSpec, image: ImageSpec, *, levels: list[int] | None = None, dim: int | None = None,
    commitment_loss_weight: float = 0.1, quantization_loss_weight: float = 0.1, optimize_values: bool = True,
    aux_weight: float | None = None,
) -> LibraryQuantizer:
    """LatentQuantize (Hsu et al. 2023): a learned value grid per channel, prod(levels) = V."""
    vqp = library("latent-quant")
    levels = check_levels("latent-quant", levels, latent.codes) if levels is not None else default_levels("latent-quant", latent.codes)
    module = _build("latent-quant", vqp.LatentQuantize, levels=levels, dim=dim or len(levels),
                    commitment_loss_weight=commitment_loss_weight, quantization_loss_weight=quantization_loss_weight,
                    optimize_values=optimize_values)
    return LibraryQuantizer("latent-quant", module, dim=dim or len(levels), level_codes=latent.codes, levels=1,
                            aux_weight=_weight(aux_weight, image), channel_first=True)


def binary_mapper(
    latent: LatentSpec, image: ImageSpec, *, kl_loss_threshold: float = NAT, temperature: float = 1.0,
    aux_weight: float | None = None,
) -> BinaryMapperQuantizer:
    """BinaryMapper: log2 V Bernoulli bits per token, KL to uniform above a threshold as loss."""
    vqp = library("binary-mapper")
    bits = power_of_two_bits("binary-mapper", latent.codes)
    module = _build("binary-mapper", vqp.BinaryMapper, bits=bits, kl_loss_threshold=kl_loss_threshold)
    return BinaryMapperQuantizer(module, bits=bits, aux_weight=_weight(aux_weight, image), temperature=temperature)


QUANTIZERS = {
    "vq": vector_quantize, "rvq": rvq, "fsq": finite_scalar, "rfsq": rfsq, "lfq": lfq, "bsq": bsq, "rlfq": rlfq,
    "simvq": simvq, "rsimvq": rsimvq, "latent-quant": latent_quant, "binary-mapper": binary_mapper,
}


@hookimpl
def register_quantizers(register: Register) -> None:
    for name, factory in QUANTIZERS.items():
        register(name, factory)
