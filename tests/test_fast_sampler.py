"""The autoregressive sampler's fast path draws from the encoder's own distribution.

Three checks: the log q it returns is the teacher-forced log_prob of the codes it drew (to float
rounding); on a tiny encoder whose 3^2 sequences can be enumerated, the frequencies of 100,000
draws match exp(log_prob) (chi-square), also at temperature 0.5 against the tempered
conditionals; and it draws what the module-by-module path (``_step`` with a growing
``_KVCache``, which ``relaxed_sample`` still uses) draws from the same uniforms, with and
without dropout (its matmul attention changes only low bits).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from ngkit.components import ImageSpec, LatentSpec
from ngkit_plugins.transformer_encoder import InverseCdfDraw, TransformerEncoder, _KVCache, _samplable


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


def _encoder(dropout: float = 0.0, grid=(4, 4), codes: int = 32, image: int = 16) -> TransformerEncoder:
    torch.manual_seed(0)
    return TransformerEncoder(image=ImageSpec(3, image, image), latent=LatentSpec(grid, codes), width=32, depth=1,
                              heads=4, latent_depth=2, dropout=dropout)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logq_is_the_teacher_forced_log_prob(temperature, one_thread):
    enc = _encoder().eval()
    x = torch.rand(3, 3, 16, 16)
    z, logq = enc.sample(x, 5, temperature)
    assert z.shape == (5, 3, 16) and z.min() >= 0 and z.max() < 32
    with torch.no_grad():
        ref = enc.log_prob(x, z).logq
    assert torch.allclose(logq, ref, rtol=1e-6, atol=1e-4), (logq - ref).abs().max()
    assert not logq.requires_grad and not torch.is_inference(z) and not torch.is_inference(logq)


@pytest.mark.parametrize(("dropout", "temperature"), [(0.0, 1.0), (0.2, 1.0), (0.0, 0.7)])
def test_fast_path_draws_what_the_module_path_draws(dropout, temperature, one_thread):
    enc = _encoder(dropout)
    enc.train(dropout > 0)
    x = torch.rand(3, 3, 16, 16)
    for seed in range(3):
        torch.manual_seed(seed)
        z, logq = enc.sample(x, 5, temperature)
        torch.manual_seed(seed)
        with torch.no_grad():
            ref_z, ref_logq = reference_autoregress(enc, enc.features(x), 5, InverseCdfDraw(16, temperature))
        assert torch.equal(z, ref_z.transpose(0, 1))
        assert torch.allclose(logq, ref_logq.transpose(0, 1), rtol=1e-6, atol=1e-4)
    with torch.no_grad():
        greedy = reference_autoregress(enc.eval(), enc.features(x), 1, lambda logp: logp.argmax(-1))[0][:, 0]
    assert torch.equal(enc.mode(x), greedy)


# chi-square with 8 degrees of freedom (9 sequences): P(X > 37.3) = 1e-5 under the null
CHI2_8_CRITICAL = 37.3


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampled_sequences_follow_the_encoders_distribution(temperature, one_thread):
    """2 tokens x 3 codes: every one of the 9 sequences' probability is enumerable from the
    teacher-forced pass; 50,000 draws per image must match it (chi-square, and each frequency
    within 5 standard errors)."""
    enc = _encoder(grid=(1, 2), codes=3, image=4).eval()
    torch.manual_seed(1)
    x = torch.rand(2, 3, 4, 4)
    k = 50_000
    torch.manual_seed(5)
    z, _ = enc.sample(x, k, temperature)  # [K, B, 2]
    seqs = torch.tensor(list(itertools.product(range(3), repeat=2)))  # [9, 2]
    with torch.no_grad():
        out = enc.log_prob(x, seqs.unsqueeze(1).expand(9, 2, 2))  # logits [9, B, 2, 3]
    # the draw's law: the product over tokens of the conditionals raised to 1/temperature
    cond = (out.logits / temperature).log_softmax(-1).gather(-1, seqs[:, None, :, None].expand(9, 2, 2, 1))
    expected = cond.squeeze(-1).sum(-1).exp().T  # [B, 9]
    assert torch.allclose(expected.sum(-1), torch.ones(2), atol=1e-5)
    if temperature == 1.0:
        assert torch.allclose(expected, out.logq.exp().T, atol=1e-6)
    index = z[..., 0] * 3 + z[..., 1]  # [K, B]
    for b in range(2):
        counts = torch.bincount(index[:, b], minlength=9).double()
        mean = k * expected[b].double()
        chi2 = ((counts - mean) ** 2 / mean).sum().item()
        assert chi2 < CHI2_8_CRITICAL, (chi2, counts, mean)
        se = (mean * (1 - expected[b].double())).sqrt()
        assert ((counts - mean).abs() <= 5 * se).all()
    assert expected.min() > 0.005 and expected.max() < 0.7  # a non-trivial law was tested
    second = out.logits[:, :, 1].softmax(-1)  # q(z_2 | z_1, x) [9, B, 3] for z_1 = 0, 0, 0, 1, ...
    assert (second[0] - second[3]).abs().max() > 0.01  # and z_2 depends on z_1


def test_a_diverged_encoder_still_yields_valid_codes(one_thread):
    """NaN weights: codes stay in range, log q is non-finite, so the trainer skips the step."""
    enc = _encoder().eval()
    with torch.no_grad():
        enc.head.weight[0, 0] = float("nan")
    z, logq = enc.sample(torch.rand(2, 3, 16, 16), 3)
    assert z.min() >= 0 and z.max() < 32
    assert not torch.isfinite(logq).any()


def test_samplable_makes_only_bad_rows_uniform():
    probs = torch.tensor([[0.2, 0.8], [float("nan"), 1.0], [0.5, 0.5]])
    fixed = _samplable(probs)
    assert torch.equal(fixed, torch.tensor([[0.2, 0.8], [0.5, 0.5], [0.5, 0.5]]))
    good = torch.tensor([[0.1, 0.9]])
    assert _samplable(good) is good  # nothing to fix: no copy
