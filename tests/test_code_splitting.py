"""Reviving dead codes by splitting a used one: q(z|x) and the decoder are preserved exactly
(noise 0) up to the relabelling, and dead codes are the ones split."""

from __future__ import annotations

import math

import pytest
import torch

from ngkit.components import ImageSpec, LatentSpec
from ngkit.methods.categorical_vae import DeadCodeSplitter
from ngkit_plugins.conv_decoder import ConvDecoder
from ngkit_plugins.transformer_encoder import TransformerEncoder

IMAGE, LATENT = ImageSpec(3, 8, 8), LatentSpec((2, 2), 6)


@pytest.mark.parametrize("factorised", [True, False])
def test_encoder_split_halves_the_source_and_keeps_relabelled_sequences(factorised):
    torch.manual_seed(0)
    enc = TransformerEncoder(image=IMAGE, latent=LATENT, width=16, depth=1, heads=2, latent_depth=1, factorised=factorised)
    x = torch.rand(3, 3, 8, 8)
    z = torch.randint(0, 5, (3, 4))
    z[:, 1] = 2
    with torch.no_grad():
        enc.head.bias[5] = -60.0  # code 5 is dead: q gives it no mass
    before = enc.log_prob(x, z)
    enc.split_codes(torch.tensor([5]), torch.tensor([2]))
    after = enc.log_prob(x, z)
    relabelled = z.clone()
    relabelled[:, 1] = 5
    # every occurrence of code 2 lost log 2, and the same sequence with 5 in its place has the same mass
    n2 = (z == 2).sum(-1).double()
    torch.testing.assert_close(after.logq.double(), before.logq.double() - n2 * math.log(2), atol=1e-4, rtol=0)
    if factorised:
        moved = enc.log_prob(x, relabelled).logq
        torch.testing.assert_close(moved, after.logq, atol=1e-4, rtol=0)
    total = torch.logsumexp(enc.log_prob(x, z).logits, -1)
    torch.testing.assert_close(total, torch.zeros_like(total), atol=1e-5, rtol=0)


def test_decoder_split_copies_the_embedding():
    torch.manual_seed(0)
    dec = ConvDecoder(image=IMAGE, latent=LATENT, width=8, embed_dim=8).eval()
    dec.split_codes(torch.tensor([4]), torch.tensor([1]), noise=0.0, generator=torch.Generator().manual_seed(0))
    a, b = torch.tensor([[1, 0, 2, 3]]), torch.tensor([[4, 0, 2, 3]])
    torch.testing.assert_close(dec(dec.embed(a)), dec(dec.embed(b)))


def test_splitter_picks_the_dead_codes_and_resets():
    torch.manual_seed(0)
    enc = TransformerEncoder(image=IMAGE, latent=LATENT, width=16, depth=1, heads=2, latent_depth=1, factorised=True)
    dec = ConvDecoder(image=IMAGE, latent=LATENT, width=8, embed_dim=8)
    splitter = DeadCodeSplitter(6, every=2, noise=0.1, below=0.1)
    splitter.observe(torch.tensor([[0, 1, 1, 3]] * 10 + [[2, 0, 0, 0]]))  # code 2: 1 of 44 draws
    assert splitter.maybe_split(1, enc, dec) == {}  # not a check step
    head_before = enc.head.weight.detach().clone()
    logs = splitter.maybe_split(2, enc, dec)
    assert logs == {"codes_split": 2.0}  # codes 4 and 5 were never drawn; 2 is rare but above 0.1
    assert splitter.counts.sum() == 0
    for dead in (4, 5):
        assert any(torch.equal(enc.head.weight[dead], head_before[src]) for src in (0, 1, 3))
