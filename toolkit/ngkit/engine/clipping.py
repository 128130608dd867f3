"""Adaptive gradient clipping (Brock et al. 2021, NFNets), as used by DAPS at 1.0."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def _unitwise_norm(t: Tensor) -> Tensor:
    """Norm per output unit: rows of a matrix, filters of a conv, the whole of a vector/scalar."""
    if t.ndim <= 1:
        return torch.linalg.vector_norm(t)
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)), keepdim=True)


@torch.no_grad()
def adaptive_clip_(params: Iterable[torch.nn.Parameter], clip: float, eps: float = 1e-3) -> None:
    """Scale each unit's gradient so that ||g|| <= clip * max(||w||, eps), in place."""
    for p in params:
        if p.grad is None:
            continue
        max_norm = _unitwise_norm(p).clamp_min(eps) * clip
        g_norm = _unitwise_norm(p.grad)
        scale = (max_norm / g_norm.clamp_min(1e-6)).clamp(max=1.0)
        p.grad.mul_(scale)


@torch.no_grad()
def grads_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
