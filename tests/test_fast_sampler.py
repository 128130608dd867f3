"""The autoregressive sampler's fast path draws exactly what the module-by-module path drew.

The reference is the sampler as it was (``_step`` with a growing ``_KVCache``, which
``relaxed_sample`` still uses): same generator state in, the same codes and the same log q out,
bit for bit, with and without dropout and at any temperature.
"""

from __future__ import annotations

import pytest
import torch

from ngkit.components import ImageSpec, LatentSpec
from ngkit_plugins.transformer_encoder import TransformerEncoder, _KVCache, _samplable


def reference_autoregress(enc, feats, num_samples, pick):
    """The sampler before the fast path, verbatim but for names."""
    b, length = feats.shape[0], enc.latent.tokens
    memory = [block.cross.memory(feats) for block in enc.latent_blocks]
    caches = [_KVCache(length) for _ in enc.latent_blocks]
    prev = feats.new_full((b, num_samples, 1), enc.latent.codes, dtype=torch.long)
    z = feats.new_empty((b, num_samples, length), dtype=torch.long)
    logq = feats.new_zeros((b, num_samples))
    for t in range(length):
        logp = enc._step(prev, t, memory, caches)
        token = pick(logp)
        z[:, :, t] = token
        logq += logp.gather(-1, token.unsqueeze(-1)).squeeze(-1)
        prev = token.unsqueeze(-1)
    return z, logq


def reference_draw(temperature):
    def draw(logp):
        probs = (logp / temperature).softmax(-1)
        bad = ~torch.isfinite(probs).all(-1, keepdim=True)
        if bad.any():
            probs = torch.where(bad, torch.full_like(probs, 1.0 / probs.shape[-1]), probs)
        return torch.multinomial(probs.flatten(0, -2), 1).view(probs.shape[:-1])

    return draw


@pytest.mark.parametrize(("dropout", "temperature"), [(0.0, 1.0), (0.2, 1.0), (0.0, 0.7)])
def test_fast_sampler_draws_what_the_reference_drew(dropout, temperature, one_thread):
    torch.manual_seed(0)
    enc = TransformerEncoder(image=ImageSpec(3, 16, 16), latent=LatentSpec((4, 4), 32), width=32, depth=1,
                             heads=4, latent_depth=2, dropout=dropout)
    enc.train(dropout > 0)
    x = torch.rand(3, 3, 16, 16)
    for seed in range(3):
        torch.manual_seed(seed)
        z, logq = enc.sample(x, 5, temperature)
        torch.manual_seed(seed)
        with torch.no_grad():
            ref_z, ref_logq = reference_autoregress(enc, enc.features(x), 5, reference_draw(temperature))
        assert torch.equal(z, ref_z.transpose(0, 1)) and torch.equal(logq, ref_logq.transpose(0, 1))
    with torch.no_grad():
        greedy = reference_autoregress(enc.eval(), enc.features(x), 1, lambda logp: logp.argmax(-1))[0][:, 0]
    assert torch.equal(enc.mode(x), greedy)


def test_samplable_makes_only_bad_rows_uniform():
    probs = torch.tensor([[0.2, 0.8], [float("nan"), 1.0], [0.5, 0.5]])
    fixed = _samplable(probs)
    assert torch.equal(fixed, torch.tensor([[0.2, 0.8], [0.5, 0.5], [0.5, 0.5]]))
    good = torch.tensor([[0.1, 0.9]])
    assert _samplable(good) is good  # nothing to fix: no copy
