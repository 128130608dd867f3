"""The contracts between the core and plugins: what each registered factory must build.

A plugin registers a *factory* (usually a class) under a name; the core calls it with the
options a recipe gives plus any *context* arguments it declares by name (see
:data:`CONTEXT_ARGS`). The objects it returns follow the protocols below.

Shapes: ``B`` images per batch, ``K`` samples per image, ``L`` tokens per image (the latent
grid, row-major), ``V`` codes in the vocabulary, images ``[B, C, H, W]`` with pixels in [0, 1].
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Register = Callable[[str, Callable[..., Any]], None]
"""Callback handed to ``register_<kind>s`` hooks: ``register(name, factory)``."""


@dataclass(frozen=True)
class ImageSpec:
    """Shape and pixel statistics of a dataset's images (statistics in [0, 1] pixel units)."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @property
    def num_pixels(self) -> int:
        return self.channels * self.height * self.width


@dataclass(frozen=True)
class LatentSpec:
    """The discrete code: a ``grid`` of tokens (rows, cols), each one of ``codes`` symbols."""

    grid: tuple[int, int]
    codes: int

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def bits_per_image(self) -> float:
        return self.tokens * math.log2(self.codes)


@dataclass(frozen=True)
class Ref:
    """Marks a factory parameter as a sub-component picked by name from another registry.

    ``step_size: Annotated[StepSizePolicy, Ref("step_size_policies")] = "ess"`` lets a recipe
    write ``step_size = "kl"`` or ``[method.step_size] name = "kl"  bound = 0.1``; the core
    builds the component and passes the object.
    """

    kind: str


# Factory parameters with these names are filled in by the core, never by a recipe.
CONTEXT_ARGS: dict[str, str] = {
    "image": "ImageSpec of the recipe's dataset",
    "latent": "LatentSpec from [model] codes and patch_size",
    "encoder": "the built Encoder (methods only)",
    "decoder": "the built Decoder (methods only)",
    "beta": "the built BetaSchedule (methods only)",
    "total_steps": "run.steps of the recipe",
    "classes": "class labels in a prior's code dataset (priors only)",
    "channels": "[data] channels: 1 or 3, None for the dataset's own (datasets only)",
}


@dataclass(frozen=True)
class Example:
    """One training example, decoded only when :meth:`load` is called.

    The core skips the examples another DataLoader worker will decode (and, on resume, the ones
    already trained on) without loading them. ``load`` returns a ``[C, H, W]`` float image in
    [0, 1], or uint8 in 0-255 (the core divides by 255 once per batch); it raises for an unreadable file, which the core skips, counts and names once."""

    load: Callable[[], Tensor]
    name: str = ""  # shown in warnings about unreadable images, e.g. the file name


@runtime_checkable
class ImageDataset(Protocol):
    """A source of images: training epochs split into shards, and a fixed held-out split.

    The core reads shard ``shard`` of ``num_shards`` on each data reader (one per rank, times the
    DataLoader workers). For a given ``(seed, epoch)`` the shards must partition the epoch: every
    example in exactly one shard. Prefer example-level striding (shard ``j`` takes examples
    ``j, j + n, j + 2n, ...`` of the epoch's order) with the epoch's order and every random
    augmentation keyed by the example's position, so that the global batch does not depend on the
    number of ranks and a resumed run sees exactly the images the uninterrupted one would.

    Optional: ``endless = True`` for a dataset whose training epoch never ends (fresh random
    crops), and ``labelled(split) -> Iterable[(image, label)]`` listing a split once with its class
    labels (``ngkit encode`` writes them next to the codes).
    """

    spec: ImageSpec

    def train(self, *, seed: int, epoch: int, shard: int, num_shards: int, start: int = 0) -> Iterable[Example]:
        """Yield this shard's examples of ``epoch`` from its ``start``-th on. A finite epoch ends
        the iterable (the core then asks for ``epoch + 1``); a dataset that draws fresh images
        forever may yield without end."""
        ...

    def test(self, *, shard: int, num_shards: int, limit: int | None) -> Iterable[Tensor]:
        """Yield held-out images ``shard, shard + num_shards, ...`` of the first ``limit``, the
        same on every call; pixels in [0, 1]."""
        ...


@dataclass
class TokenLogProb:
    """Teacher-forced output of an encoder for given codes."""

    logq: Tensor  # [..., B] log q(z|x), summed over tokens
    logits: Tensor  # [..., B, L, V] normalised log-probabilities per token
    entropy: Tensor  # [..., B, L] entropy of each token's conditional distribution (nats)


class Encoder(nn.Module):
    """q(z|x): image -> distribution over L tokens of V codes (autoregressive or factorised)."""

    latent: LatentSpec
    autoregressive: bool
    feature_dim: int

    def features(self, x: Tensor) -> Tensor:
        """Continuous per-token features ``[B, L, feature_dim]`` (used by VQ-VAE/FSQ methods)."""
        raise NotImplementedError

    def log_prob(self, x: Tensor, z: Tensor) -> TokenLogProb:
        """Teacher-forced log q(z|x) in one pass; ``z`` is ``[B, L]`` or ``[K, B, L]`` long
        (K samples per image, x encoded once) -> ``logq [..., B]``, ``entropy [..., B, L]``."""
        raise NotImplementedError

    def sample(self, x: Tensor, num_samples: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """Draw ``z [K, B, L]`` and its ``logq [K, B]`` without gradients (x encoded once)."""
        raise NotImplementedError

    def sample_log_prob(self, x: Tensor, num_samples: int) -> tuple[Tensor, TokenLogProb]:
        """Draw ``z [K, B, L]`` and its teacher-forced log q with gradient. By default
        :meth:`sample` then :meth:`log_prob`; an encoder may draw from the very logits it scores
        with (one pass instead of two)."""
        z, _ = self.sample(x, num_samples)
        return z, self.log_prob(x, z)

    def mode(self, x: Tensor) -> Tensor:
        """Greedy codes ``[B, L]`` (argmax token by token) for evaluation and export."""
        raise NotImplementedError

    def relaxed_sample(self, x: Tensor, temperature: float, hard: bool) -> tuple[Tensor, Tensor]:
        """Gumbel-Softmax sample ``y [B, L, V]`` (soft one-hot; straight-through one-hot if
        ``hard``) with gradients, and the logits ``[B, L, V]`` it was drawn from. An
        autoregressive encoder feeds its own relaxed tokens back in."""
        raise NotImplementedError

    def describe(self) -> dict[str, str]:
        """Facts for the run log (e.g. the attention kernel in use); empty by default."""
        return {}

    def split_codes(self, dst: Tensor, src: Tensor) -> None:
        """Make each code ``dst[i]`` a copy of ``src[i]`` that takes half of its probability, so
        q(z|x) is unchanged up to the relabelling (used to revive dead codes)."""
        raise NotImplementedError


class Decoder(nn.Module):
    """p(x|z): token embeddings on the latent grid -> per-pixel likelihood."""

    embed_dim: int

    def embed(self, z: Tensor) -> Tensor:
        """Codes ``[..., L]`` (long) or soft one-hots ``[..., L, V]`` -> ``[..., L, embed_dim]``."""
        raise NotImplementedError

    def forward(self, h: Tensor) -> Tensor:
        """Likelihood parameters for token embeddings ``h [B, L, embed_dim]``."""
        raise NotImplementedError

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """log p(x|z) per image ``[B]``, summed over pixels; ``x`` in [0, 1]."""
        raise NotImplementedError

    def pixel_log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """Optional: log p(x|z) per pixel ``[B, C, H, W]`` (``log_prob`` is its sum over pixels);
        DAPS's per-token credit (``[method] credit = "token"``) needs it."""
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:
        """The reconstruction ``[B, C, H, W]`` in [0, 1] pixel space."""
        raise NotImplementedError

    def split_codes(self, dst: Tensor, src: Tensor, noise: float, generator: torch.Generator) -> None:
        """Give each code ``dst[i]`` the embedding of ``src[i]`` plus relative Gaussian ``noise``."""
        raise NotImplementedError


class StepOutput(NamedTuple):
    """What a method's forward returns: the loss to minimise and numbers to log (floats, or the
    float64 scalars :func:`host_logs` leaves on the device inside the engine's step).

    A tuple, so that DeepSpeed's engine finds the loss tensor among the outputs."""

    loss: Tensor
    logs: dict[str, float | Tensor]


# Set by the engine's training step (ngkit.engine.step): logs then stay on the device and reach
# the host only at the loop's log interval, so no step waits for the device to report them.
DEFER_LOGS: contextvars.ContextVar[bool] = contextvars.ContextVar("ngkit_defer_logs", default=False)

# Set by the training loop around each step: whether this step's logs will be read (the step closes
# a log window). A log that costs model work and is only read, never used by the update (DAPS's
# encoder_kl without a trust region), is measured only when this is true; outside the loop
# (direct calls, tests) every step counts as read. The loop averages each key over the steps of
# its window that reported it.
LOGS_READ: contextvars.ContextVar[bool] = contextvars.ContextVar("ngkit_logs_read", default=True)


def logs_read() -> bool:
    """Whether the logs of the step now running will be read (see :data:`LOGS_READ`)."""
    return LOGS_READ.get()


def host_logs(stats: dict[str, Tensor]) -> dict[str, float | Tensor]:
    """Scalar tensors -> floats in one device-to-host copy (a sync: one per call, not per number).
    Inside the engine's step: detached float64 scalars on the device instead, no sync; the step
    averages them there and the loop copies them to the host at ``log_every``."""
    device = next(iter(stats.values())).device
    values = torch.stack([v.detach().double().to(device) for v in stats.values()])
    if DEFER_LOGS.get():
        return dict(zip(stats, values.unbind()))
    return dict(zip(stats, values.tolist()))


class Method(nn.Module):
    """A training method (DAPS or a baseline). Owns every trainable module; the engine wraps
    it with DeepSpeed, calls ``forward`` for the loss, steps the optimiser, then
    ``after_step`` for updates that are not gradient steps (step size η, EMA codebooks)."""

    latent: LatentSpec
    can_sample: bool = False
    """Declared capability: codes can be drawn from q(z|x) with ``sample_codes(x)`` (export
    writes ``sample: true``, ``Tokenizer.encode(sample=True)`` and ``ngkit eval --codes sample``
    work)."""
    post_step_pass: bool = False
    """Declared cost: the update needs one gradient-free encoder pass after the optimiser step
    (DAPS projecting its step into the trust region), which ``ngkit bench`` counts in the floor."""

    def forward(self, x: Tensor, step: int) -> StepOutput:  # type: ignore[override]
        raise NotImplementedError

    def after_step(self, step: int) -> dict[str, float]:
        """Called once after each optimiser step that was taken (not after skipped steps)."""
        return {}

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Deterministic codes ``[B, L]`` for an image batch (evaluation, export)."""
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` in [0, 1] from codes ``[B, L]``."""
        raise NotImplementedError

    @torch.no_grad()
    def beta_elbo(self, x: Tensor, beta: float) -> Tensor | None:
        """Per-image E_q[log p(x|z)] - beta * KL(q(z|x) || uniform), or None where undefined."""
        return None


@dataclass
class ProxyWeights:
    """Self-normalised importance weights of the proxy posterior over K samples."""

    weights: Tensor  # [K, B], sums to 1 over K
    advantages: Tensor  # [K, B]
    ess: Tensor  # scalar, mean over images of 1 / sum_k w^2 (in samples, 1..K)
    kl: Tensor  # scalar, sample estimate of KL(q~ || q), mean over images


class PosteriorProxy(Protocol):
    def __call__(self, logp: Tensor, logq: Tensor, eta: float | Tensor, beta: float) -> ProxyWeights:
        """Weights of q~ ∝ q^(eta/(eta+beta)) exp(r/(eta+beta)) for rewards ``logp [K, B]``."""
        ...


class StepSizePolicy(Protocol):
    """Chooses the trust-region multiplier η of the DAPS update."""

    def eta(self, logp: Tensor, logq: Tensor, beta: float) -> Tensor:
        """η to use for this batch (detached scalar)."""
        ...

    def update(self, logp: Tensor, logq: Tensor, beta: float) -> dict[str, float]:
        """Adapt after a taken step; returns numbers to log (e.g. ``eta``, ``eta_loss``)."""
        ...


Quantized = tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]
"""``(quantized [B, L, dim], codes [B, L], aux_loss, logs)``, what ``Quantizer.forward`` returns."""


class Quantizer(nn.Module):
    """Continuous token features -> discrete codes (``register_quantizers``; used by the VQ-VAE
    and FSQ methods). ``forward(h [B, L, dim])`` returns ``quantized`` with a straight-through
    gradient to ``h``, ``codes [B, L]`` (long), ``aux_loss`` (scalar, nats per image, added to
    -log p(x|z)) and ``logs`` (detached scalar tensors). State such as EMA codebooks lives in
    buffers, so that it is checkpointed."""

    dim: int

    def forward(self, h: Tensor) -> Quantized:  # type: ignore[override]
        raise NotImplementedError

    def codes_to_vectors(self, codes: Tensor) -> Tensor:
        """What ``forward`` returns as ``quantized`` for those codes ``[B, L]`` -> ``[B, L, dim]``."""
        raise NotImplementedError

    def after_step(self) -> dict[str, float]:
        """Updates that are not gradient steps (EMA codebook, dead-code restarts), once per taken step."""
        return {}


def pixel_stats(image: ImageSpec) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std as ``[C, 1, 1]`` tensors; a single value applies to all channels
    (what an encoder or decoder standardises pixels with)."""
    stats = []
    for name, values in (("mean", image.mean), ("std", image.std)):
        if len(values) not in (1, image.channels):
            raise ValueError(
                f"image {name} has {len(values)} values for {image.channels} channels; give one per "
                "channel or a single value"
            )
        full = list(values) * (image.channels if len(values) == 1 else 1)
        stats.append(torch.tensor(full, dtype=torch.float32).view(-1, 1, 1))
    return stats[0], stats[1]


class BetaSchedule(Protocol):
    def __call__(self, step: int) -> float:
        """β (weight of KL(q‖uniform prior)) at a training step."""
        ...


@dataclass
class EvalBatch:
    """One batch of held-out images and what the method made of them."""

    images: Tensor  # [B, C, H, W] in [0, 1]
    reconstructions: Tensor  # [B, C, H, W] in [0, 1]
    codes: Tensor  # [B, L] long
    latent: LatentSpec
    beta_elbo: Tensor | None = None  # [B] nats, where the method defines it


class Metric(Protocol):
    """A streaming metric over held-out images; values gathered across ranks in ``compute``.

    Declared capability: ``expensive = True`` (a class attribute; absent means False) for a
    metric that is computed only at the end of training or on request (``ngkit eval``), never
    at the periodic ``[run] eval_every`` evaluations (FID: an Inception pass per image)."""

    expensive: bool

    def update(self, batch: EvalBatch) -> None: ...

    def compute(self) -> dict[str, float]: ...

    def protocol(self) -> dict[str, Any]:
        """How the number was made (reference set, N, resize, weights hash, versions)."""
        ...
