"""The CPU sampler's in-place token step draws bit for bit what the sampler before it drew.

``reference_rows`` is that sampler (``_autoregress_rows``, ``_DecodeStep.rows`` and
``InverseCdfDraw`` as they were before the step wrote its intermediates in place), verbatim but
for names. The new one must return the same codes and the same log q, exactly, over several
widths, heads, depths, lengths and batch sizes, at temperature 1 and 0.7, with dropout active
(the same random draws in the same order) and in eval mode, and under CPU bf16 autocast (whose
casts the new step makes explicitly). Its log q is also checked against the teacher-forced
``log_prob`` of the codes it drew.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ngkit.components import ImageSpec, LatentSpec
from ngkit_plugins.transformer_encoder import InverseCdfDraw, TransformerEncoder, _cast, _dropout


class ReferenceDraw:
    """InverseCdfDraw before this change."""

    def __init__(self, length: int, temperature: float = 1.0) -> None:
        self.length, self.temperature, self.uniforms, self.t = length, temperature, None, 0

    def __call__(self, logp):
        if self.uniforms is None:
            self.uniforms = torch.rand((self.length, *logp.shape[:-1], 1), device=logp.device, dtype=torch.float32)
        u = self.uniforms[self.t]
        self.t += 1
        probs = logp.float().exp() if self.temperature == 1 else (logp.float() / self.temperature).softmax(-1)
        cdf = probs.cumsum(-1)
        token = torch.searchsorted(cdf, u * cdf[..., -1:], right=True)
        return token.clamp_max_(cdf.shape[-1] - 1).squeeze(-1)


def _reference_block(block, k, v, n, length, width):
    """_DecodeStep._bind_rows before this change: returns its ``rows`` as a closure."""
    heads = block.attn.heads
    hd = width // heads
    scale = hd**-0.5
    qkv = block.attn.qkv.weight.detach().clone()
    qkv[:width] *= scale
    w_qkv = qkv.view(3, heads, hd, width).transpose(0, 1).reshape(3 * width, width).t().contiguous()
    up, _, down = block.mlp
    ln1, ln2, ln3 = block.ln1, block.ln2, block.ln3
    w_out, b_out = block.attn.out.weight.t().contiguous(), block.attn.out.bias
    w_cq = (block.cross.q.weight.detach() * scale).t().contiguous()
    w_cout, b_cout = block.cross.out.weight.t().contiguous(), block.cross.out.bias
    w_up, w_down = up.weight.t().contiguous(), down.weight.t().contiguous()
    b, p = k.shape[0], k.shape[1]
    mem_kt = k.permute(0, 2, 3, 1).reshape(b * heads, hd, p)
    mem_v = v.transpose(1, 2).reshape(b * heads, p, hd)
    cache_kt = k.new_empty(n * heads, hd, length)
    cache_v = k.new_empty(n * heads, length, hd)
    drop = _dropout(block.drop)

    def rows(x, t):
        n, d = x.shape
        bh = mem_kt.shape[0]
        h = torch.layer_norm(x, (d,), ln1.weight, ln1.bias, ln1.eps)
        q, key, value = torch.mm(h, w_qkv).view(n * heads, 3, hd).unbind(1)
        cache_kt[:, :, t] = key
        cache_v[:, t] = value
        att = torch.bmm(q.unsqueeze(1), cache_kt[:, :, : t + 1]).softmax(-1)
        x = x + drop(torch.addmm(b_out, torch.bmm(att, cache_v[:, : t + 1]).view(n, d), w_out))
        h = torch.layer_norm(x, (d,), ln2.weight, ln2.bias, ln2.eps)
        q = torch.mm(h, w_cq).view(bh // heads, n * heads // bh, heads, hd).transpose(1, 2).reshape(bh, -1, hd)
        att = torch.bmm(q, mem_kt).softmax(-1)
        out = torch.bmm(att, mem_v).view(bh // heads, heads, -1, hd).transpose(1, 2).reshape(n, d)
        x = x + drop(torch.addmm(b_cout, out, w_cout))
        h = torch.layer_norm(x, (d,), ln3.weight, ln3.bias, ln3.eps)
        return x + drop(torch.addmm(down.bias, F.gelu(torch.addmm(up.bias, h, w_up)), w_down))

    return rows


def reference_rows(enc, feats, num_samples, pick):
    """TransformerEncoder._autoregress_rows before this change, as _autoregress called it."""
    b, length = feats.shape[0], enc.latent.tokens
    n = b * num_samples
    steps = []
    for block in enc.latent_blocks:
        k, v = block.cross.memory(feats)
        steps.append(_reference_block(block, k, v, n, length, feats.shape[-1]))
    drop, norm = _dropout(enc.drop), enc.latent_norm
    table, pos = enc.tokens_in.weight, enc.tokens_in.pos
    head_w, head_b = enc.head.weight.t().contiguous(), enc.head.bias
    token = feats.new_full((n,), enc.latent.codes, dtype=torch.long)
    z = feats.new_empty((b, num_samples, length), dtype=torch.long)
    lq = None
    for t in range(length):
        h = drop(torch.index_select(table, 0, token) + pos[t])
        for step in steps:
            h = step(h, t)
        h = torch.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        logp = F.log_softmax(torch.addmm(head_b, h, head_w), dim=-1).view(b, num_samples, -1)
        picked = pick(logp)
        z[:, :, t] = picked
        if lq is None:
            lq = logp.new_empty((length, b, num_samples, 1))
        torch.gather(logp, -1, picked.unsqueeze(-1), out=lq[t])
        token = picked.view(n)
    return z, lq.sum(0).squeeze(-1)


# (width, heads, latent_depth, grid, codes, images B, samples K)
SHAPES = [
    (32, 4, 2, (4, 4), 32, 3, 5),
    (24, 3, 1, (2, 3), 17, 1, 2),
    (64, 8, 2, (6, 6), 64, 2, 4),
    (16, 1, 3, (1, 8), 5, 4, 1),
]


def _encoder(width, heads, depth, grid, codes, dropout=0.0):
    torch.manual_seed(0)
    return TransformerEncoder(image=ImageSpec(3, 4 * grid[0], 4 * grid[1]), latent=LatentSpec(grid, codes),
                              width=width, depth=1, heads=heads, latent_depth=depth, dropout=dropout)


def _both(enc, x, k, temperature, seed):
    """(new sampler's codes, log q), (reference's), both [B, K, ...] from the same seed."""
    torch.manual_seed(seed)
    z, logq = enc.sample(x, k, temperature)
    torch.manual_seed(seed)
    with torch.no_grad():
        feats = enc.features(x)
        with torch.inference_mode():
            ref = reference_rows(enc, feats, k, ReferenceDraw(enc.latent.tokens, temperature))
    return (z.transpose(0, 1), logq.transpose(0, 1)), ref


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "w{}h{}d{}g{}x{}V{}B{}K{}".format(*s[:3], *s[3], *s[4:]))
@pytest.mark.parametrize(("dropout", "train", "temperature"), [(0.0, False, 1.0), (0.0, False, 0.7), (0.2, True, 1.0),
                                                               (0.2, False, 0.7)])
def test_same_codes_and_logq_bit_for_bit(shape, dropout, train, temperature, one_thread):
    width, heads, depth, grid, codes, b, k = shape
    enc = _encoder(width, heads, depth, grid, codes, dropout).train(train)
    x = torch.rand(b, 3, 4 * grid[0], 4 * grid[1])
    for seed in range(2):
        (z, logq), (ref_z, ref_logq) = _both(enc, x, k, temperature, seed)
        assert torch.equal(z, ref_z)
        assert torch.equal(logq, ref_logq)
    if train:  # greedy decoding is compared in eval mode
        return
    with torch.no_grad():
        feats = enc.features(x)
        with torch.inference_mode():
            greedy = reference_rows(enc, feats, 1, lambda logp: logp.argmax(-1))[0][:, 0]
    assert torch.equal(enc.mode(x), greedy)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_same_under_cpu_bf16_autocast(shape, one_thread):
    """Autocast casts the matmuls' inputs and weights to bf16; the in-place step, whose out=
    matmuls bypass autocast, casts them itself, to the same numbers."""
    width, heads, depth, grid, codes, b, k = shape
    enc = _encoder(width, heads, depth, grid, codes).eval()
    x = torch.rand(b, 3, 4 * grid[0], 4 * grid[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (z, logq), (ref_z, ref_logq) = _both(enc, x, k, 1.0, 0)
    assert logq.dtype == ref_logq.dtype == torch.bfloat16
    assert torch.equal(z, ref_z)
    assert torch.equal(logq, ref_logq)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "w{}h{}d{}".format(*s[:3]))
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logq_is_the_teacher_forced_log_prob_of_the_drawn_codes(shape, temperature, one_thread):
    """log q the sampler returns (temperature 1, whatever it drew at) = teacher-forced log_prob,
    with dropout configured but the encoder in eval mode."""
    width, heads, depth, grid, codes, b, k = shape
    enc = _encoder(width, heads, depth, grid, codes, dropout=0.3).eval()
    x = torch.rand(b, 3, 4 * grid[0], 4 * grid[1])
    z, logq = enc.sample(x, k, temperature)
    assert z.shape == (k, b, grid[0] * grid[1]) and 0 <= z.min() and z.max() < codes
    with torch.no_grad():
        ref = enc.log_prob(x, z).logq
    assert torch.allclose(logq, ref, rtol=1e-6, atol=1e-4), (logq - ref).abs().max()


def test_inverse_cdf_draw_is_the_reference_draw():
    """The draw's in-place cumulative sum and narrowed total give the same codes, non-finite
    rows included."""
    logp = torch.randn(6, 3, 50).log_softmax(-1)
    logp[1, 2, 7] = float("nan")
    for temperature in (1.0, 0.5):
        torch.manual_seed(3)
        new, ref = InverseCdfDraw(6, temperature), ReferenceDraw(6, temperature)
        got = [new(logp[t]) for t in range(6)]
        torch.manual_seed(3)
        want = [ref(logp[t]) for t in range(6)]
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_cast_is_the_identity_only_between_equal_dtypes():
    x = torch.randn(3)
    assert _cast(torch.float32, torch.float32)(x) is x
    assert _cast(torch.float32, torch.bfloat16)(x).dtype == torch.bfloat16
