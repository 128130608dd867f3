"""Held-out evaluation: run a method over test images and feed every metric, streaming."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ngkit.components import EvalBatch, ImageDataset, Method, Metric
from ngkit.data import eval_batches, eval_shards
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
    """Encode, decode, and update every metric: a function of the weights and the held-out
    split alone, the same (to float64 rounding of the sums over ranks) on any number of ranks up
    to 8, after a resume and from ``ngkit eval``. Each image is computed in the same batch
    whatever the rank count (:func:`ngkit.data.eval_batches`), and any random draw (``beta_elbo``,
    sampled codes) comes from a stream seeded by ``seed``, the shard and the batch, not from the
    caller's stream, which is left alone. ``codes``: ``"argmax"``, the method's deterministic
    ``encode``; ``"sample"``, one z ~ q(z|x) per image as the DAPS reference code evaluates
    (methods declaring ``can_sample``)."""
    if codes not in ("argmax", "sample"):
        raise NgkitError(f"codes must be argmax or sample, not {codes!r}")
    sampler = getattr(method, "sample_codes", None) if getattr(method, "can_sample", False) else None
    if codes == "sample" and sampler is None:
        raise NgkitError(
            f"--codes sample: method {type(method).__name__} has no sampled codes (only methods with a "
            "categorical encoder q(z|x) have them); use --codes argmax"
        )
    encode = method.encode if codes == "argmax" else sampler
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _evaluate(method, dataset, metrics, num_images, batch_size, beta, device, rank, world_size, keep,
                         dtype, encode, seed)


def _evaluate(
    method: Method, dataset: ImageDataset, metrics: dict[str, Metric], num_images: int, batch_size: int,
    beta: float, device: torch.device, rank: int, world_size: int, keep: int, dtype: torch.dtype, encode: Any,
    seed: int,
) -> EvalResult:
    was_training = method.training
    method.eval()
    want_elbo = "beta-elbo" in metrics
    kept_i, kept_x, kept_r, seen = [], [], [], 0
    shards = eval_shards(world_size)
    for shard, index, x in eval_batches(dataset, batch_size, rank, world_size, num_images):
        torch.manual_seed(int(np.random.SeedSequence([seed, shard, index]).generate_state(1)[0]))
        x = x.to(device, dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            codes = encode(x)
            recon = method.decode(codes).float().clamp(0, 1)
            elbo = method.beta_elbo(x, beta) if want_elbo else None
        batch = EvalBatch(x.float(), recon, codes, method.latent, None if elbo is None else elbo.float())
        for metric in metrics.values():
            metric.update(batch)
        # the grid's images: this rank's lowest split positions, in split order
        position = (index * batch_size + torch.arange(x.shape[0])) * shards + shard
        near = position < keep * world_size
        if near.any():
            kept_i.append(position[near])
            kept_x.append(x[near.to(x.device)].float().cpu())
            kept_r.append(recon[near.to(recon.device)].cpu())
        seen += x.shape[0]
    method.train(was_training)
    by_metric = {name: metric.compute() for name, metric in metrics.items()}
    values = {key: value for computed in by_metric.values() for key, value in computed.items()}
    protocols = {name: metric.protocol() for name, metric in metrics.items()}
    if not kept_x:  # this rank's shards held no images
        kept_i, kept_x = [torch.empty(0, dtype=torch.long)], [torch.empty(0, *dataset.spec.shape)]
        kept_r = kept_x
    order = torch.cat(kept_i).argsort()[:keep]
    return EvalResult(values, protocols, by_metric, torch.cat(kept_x)[order], torch.cat(kept_r)[order], seen)
