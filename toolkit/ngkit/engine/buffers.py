"""Rank 0's buffers on every rank, after every step (what DDP's ``broadcast_buffers`` does).

Some buffers are updated from each rank's own batch (BatchNorm's running statistics, without
SyncBatchNorm); left alone they differ between ranks, the checkpoint keeps rank 0's, and the
held-out figures would depend on which rank evaluated which image, and on whether the run was
resumed. Broadcasting the persistent buffers makes every rank hold what the checkpoint holds.
Buffers the ranks already agree on (EMA codebooks, the trust region's α) are unchanged;
non-persistent ones (per-rank counts) are left out.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def persistent_buffers(module: nn.Module) -> list[Tensor]:
    state = module.state_dict(keep_vars=True)
    ids = {id(buffer) for buffer in module.buffers()}
    return [value for value in state.values() if isinstance(value, Tensor) and id(value) in ids]


@torch.no_grad()
def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's persistent buffers to every rank: one broadcast per dtype and device."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for buffer in persistent_buffers(module):
        groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
    for buffers in groups.values():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        torch.distributed.broadcast(flat, src=0)
        for b, part in zip(buffers, flat.split([b.numel() for b in buffers])):
            b.copy_(part.view_as(b))
