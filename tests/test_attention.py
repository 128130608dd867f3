"""The shared attention function against softmax(q kᵀ / sqrt(d)) v, and xformers against SDPA
on the same encoder weights (on CUDA only)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from ngkit.components import ImageSpec, LatentSpec
from ngkit import nn as attention_module
from ngkit.nn import attention, attention_backend
from ngkit_plugins.transformer_encoder import TransformerEncoder


def naive(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """Textbook attention on [B, M, H, K] tensors, one head at a time."""
    scores = torch.einsum("bmhk,bnhk->bhmn", q, k) / math.sqrt(q.shape[-1])
    if causal:
        m, n = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(m, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhmn,bnhk->bmhk", scores.softmax(-1), v)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_naive_attention(causal: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, causal=causal), naive(q, k, v, causal))


def test_causal_first_query_sees_only_first_key() -> None:
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8)
    torch.testing.assert_close(attention(q, k, v, causal=True)[:, 0], v[:, 0])


def test_cross_attention_with_more_keys_than_queries() -> None:
    q, k, v = torch.randn(2, 3, 2, 4), torch.randn(2, 7, 2, 4), torch.randn(2, 7, 2, 4)
    out = attention(q, k, v)
    assert out.shape == (2, 3, 2, 4)
    torch.testing.assert_close(out, naive(q, k, v, causal=False))


def test_causal_with_unequal_lengths_is_refused() -> None:
    with pytest.raises(ValueError, match="as many queries as keys"):
        attention(torch.randn(1, 1, 1, 4), torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4), causal=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_backend_is_sdpa_without_cuda() -> None:
    assert attention_backend() == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers kernels need a CUDA device")
@pytest.mark.parametrize("causal", [False, True])
def test_xformers_matches_sdpa_kernel(causal: bool) -> None:
    if attention_backend() != "xformers":
        pytest.skip("xformers is not installed or its kernels do not run with this torch build")
    q, k, v = (torch.randn(2, 33, 4, 32, device="cuda") for _ in range(3))
    fast, reference = attention_module._xformers(q, k, v, causal), attention_module._sdpa(q, k, v, causal)
    torch.testing.assert_close(fast, reference, atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers kernels need a CUDA device")
def test_encoder_outputs_same_under_xformers_and_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    if attention_backend() != "xformers":
        pytest.skip("xformers is not installed or its kernels do not run with this torch build")
    torch.manual_seed(0)
    enc = TransformerEncoder(image=ImageSpec(3, 32, 32), latent=LatentSpec((4, 4), 64)).cuda().eval()
    x = torch.rand(3, 3, 32, 32, device="cuda")
    z = torch.randint(64, (5, 3, 16), device="cuda")
    with torch.no_grad():
        torch.manual_seed(1)
        fast = enc.log_prob(x, z), enc.sample(x, 4)
        monkeypatch.setattr(attention_module, "_xformers_usable", lambda: False)
        torch.manual_seed(1)
        slow = enc.log_prob(x, z), enc.sample(x, 4)
    torch.testing.assert_close(fast[0].logits, slow[0].logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast[0].logq, slow[0].logq, atol=1e-3, rtol=1e-4)
    assert torch.equal(fast[1][0], slow[1][0])
