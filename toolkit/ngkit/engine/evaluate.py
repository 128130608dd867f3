"""Held-out evaluation: run a method over test images and feed every metric, streaming."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ngkit.components import EvalBatch, ImageDataset, Method, Metric
from ngkit.data import test_batches
from ngkit.errors import NgkitError

Codes = Literal["argmax", "sample"]


@dataclass
class EvalResult:
    values: dict[str, float]
    protocols: dict[str, dict[str, Any]]
    by_metric: dict[str, dict[str, float]]  # metric name -> the values it computed
    images: Tensor  # the first few originals, for the reconstruction grid
    reconstructions: Tensor
    num_images: int = 0


@torch.no_grad()
def evaluate(
    method: Method,
    dataset: ImageDataset,
    metrics: dict[str, Metric],
    *,
    num_images: int,
    batch_size: int,
    beta: float,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    keep: int = 8,
    dtype: torch.dtype = torch.float32,
    codes: Codes = "argmax",
    seed: int = 0,
) -> EvalResult:
    """Encode, decode, and update every metric. ``codes``: ``"argmax"``, the method's deterministic
    ``encode``; ``"sample"``, one z ~ q(z|x) per image as the DAPS reference code evaluates (methods
    declaring ``can_sample``), drawn with the random stream seeded by ``seed`` and the rank (then
    restored), so the same command gives the same numbers and the caller's stream is left alone."""
    if codes not in ("argmax", "sample"):
        raise NgkitError(f"codes must be argmax or sample, not {codes!r}")
    sampler = getattr(method, "sample_codes", None) if getattr(method, "can_sample", False) else None
    if codes == "sample" and sampler is None:
        raise NgkitError(
            f"--codes sample: method {type(method).__name__} has no sampled codes (only methods with a "
            "categorical encoder q(z|x) have them); use --codes argmax"
        )
    args = (method, dataset, metrics, num_images, batch_size, beta, device, rank, world_size, keep, dtype)
    if codes == "argmax":
        return _evaluate(*args, method.encode)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed * 1000 + rank)
        return _evaluate(*args, sampler)


def _evaluate(
    method: Method, dataset: ImageDataset, metrics: dict[str, Metric], num_images: int, batch_size: int,
    beta: float, device: torch.device, rank: int, world_size: int, keep: int, dtype: torch.dtype, encode: Any,
) -> EvalResult:
    was_training = method.training
    method.eval()
    want_elbo = "beta-elbo" in metrics
    kept_x, kept_r, seen = [], [], 0
    for x in test_batches(dataset, batch_size, rank, world_size, num_images):
        x = x.to(device, dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            codes = encode(x)
            recon = method.decode(codes).float().clamp(0, 1)
            elbo = method.beta_elbo(x, beta) if want_elbo else None
        batch = EvalBatch(x.float(), recon, codes, method.latent, None if elbo is None else elbo.float())
        for metric in metrics.values():
            metric.update(batch)
        if seen < keep:
            kept_x.append(x[: keep - seen].float().cpu())
            kept_r.append(recon[: keep - seen].cpu())
        seen += x.shape[0]
    method.train(was_training)
    by_metric = {name: metric.compute() for name, metric in metrics.items()}
    values = {key: value for computed in by_metric.values() for key, value in computed.items()}
    protocols = {name: metric.protocol() for name, metric in metrics.items()}
    return EvalResult(values, protocols, by_metric, torch.cat(kept_x), torch.cat(kept_r), seen)
