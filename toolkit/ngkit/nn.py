"""The one attention function every ngkit transformer calls.

On CUDA it uses xformers' ``memory_efficient_attention`` when xformers imports and a probe call
works; everywhere else (CPU, or xformers missing/broken) torch's
``scaled_dot_product_attention``. The probe runs once per process; :func:`attention_backend`
reports its answer so the run log and ``ngkit plugins`` can show which kernel trained a model.

Tensors use xformers' layout ``[batch, tokens, heads, head_dim]`` (what a linear projection
viewed per head gives without a copy); the SDPA path transposes views to ``[B, H, M, K]``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention", "attention_backend"]


@functools.cache
def _xformers_usable() -> bool:
    """True when CUDA is present and xformers' kernel runs (imports alone can succeed on a
    build without kernels for this torch, which then fails at the first call)."""
    if not torch.cuda.is_available():
        return False
    try:
        import xformers.ops as xops

        q = torch.zeros(1, 2, 1, 8, device="cuda")
        xops.memory_efficient_attention(q, q, q, attn_bias=xops.LowerTriangularMask())
    except Exception:  # any import or kernel failure means: use SDPA
        return False
    return True


def attention_backend() -> str:
    """``"xformers"`` or ``"sdpa"``: the kernel :func:`attention` uses for CUDA tensors in this
    process (CPU tensors always use SDPA)."""
    return "xformers" if _xformers_usable() else "sdpa"


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """Softmax(q kᵀ / sqrt(head_dim)) v over ``[B, M, H, K]`` queries and ``[B, N, H, K]`` keys.

    ``causal`` lets query i see keys 0..i and needs ``M == N`` (top-left and bottom-right
    alignment of a non-square causal mask differ between kernels, so it is refused). No padding
    masks: every token in ngkit is real.
    """
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"causal attention needs as many queries as keys, got {q.shape[1]} and {k.shape[1]}; "
            "for cached decoding pass only the past keys with causal=False"
        )
    if q.is_cuda and _xformers_usable():
        return _xformers(q, k, v, causal)
    return _sdpa(q, k, v, causal)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2)


def _xformers(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    import xformers.ops as xops

    bias = xops.LowerTriangularMask() if causal else None
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias)
