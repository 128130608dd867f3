"""The transformer encoder against references and invariants: cached vs uncached sampling,
sampling vs teacher forcing, causality, normalisation over every code sequence, the relaxed
sampler, and the ImageNet-256 build on the meta device."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from ngkit.components import ImageSpec, LatentSpec
from ngkit.plugins import get_registry
from ngkit_plugins import transformer_encoder
from ngkit_plugins.transformer_encoder import TransformerEncoder

# 4x6 image, 2x2 patches -> a non-square 2x3 grid, L = 6 tokens of V = 7 codes.
IMAGE = ImageSpec(channels=3, height=4, width=6, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
LATENT = LatentSpec(grid=(2, 3), codes=7)
TINY = dict(width=16, depth=1, heads=2, latent_depth=2)


def make(
    factorised: bool = False, image: ImageSpec = IMAGE, latent: LatentSpec = LATENT
) -> TransformerEncoder:
    torch.manual_seed(0)
    return TransformerEncoder(image=image, latent=latent, factorised=factorised, **TINY).eval()


def images(b: int = 3) -> Tensor:
    return torch.rand(b, *IMAGE.shape, generator=torch.Generator().manual_seed(1))


def codes(*shape: int) -> Tensor:
    return torch.randint(LATENT.codes, shape, generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def uncached_sample(enc: TransformerEncoder, x: Tensor, k: int, temperature: float) -> Tensor:
    """Reference sampler: re-runs the full teacher-forced pass for every token. Draws rows in
    the same [B, K] order and from the same uniforms as the cached sampler (its inverse-CDF
    draw), so one seed gives the same codes."""
    b, length = x.shape[0], enc.latent.tokens
    draw = transformer_encoder.InverseCdfDraw(length, temperature)
    z = torch.zeros(k, b, length, dtype=torch.long)
    for t in range(length):
        logp = enc.log_prob(x, z).logits[:, :, t]  # [K, B, V]; depends only on z[..., :t]
        z[:, :, t] = draw(logp.transpose(0, 1)).T
    return z


def test_registered_as_transformer() -> None:
    assert get_registry().get("encoders", "transformer").factory is TransformerEncoder


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_cached_sampler_equals_uncached_reference(temperature: float) -> None:
    enc, x = make(), images()
    torch.manual_seed(123)
    z, logq = enc.sample(x, 4, temperature=temperature)
    torch.manual_seed(123)
    z_ref = uncached_sample(enc, x, 4, temperature)
    assert torch.equal(z, z_ref)
    assert len(z.unique()) > 1


@pytest.mark.parametrize("factorised", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sample_logq_equals_teacher_forced(factorised: bool, temperature: float) -> None:
    """logq from sample is log q under the model (temperature 1), whatever temperature drew z."""
    enc, x = make(factorised), images()
    z, logq = enc.sample(x, 5, temperature=temperature)
    assert z.shape == (5, 3, LATENT.tokens) and z.dtype == torch.long and logq.shape == (5, 3)
    assert z.min() >= 0 and z.max() < LATENT.codes
    with torch.no_grad():
        torch.testing.assert_close(logq, enc.log_prob(x, z).logq, rtol=0, atol=1e-4)


def test_causal_changing_token_l_changes_only_later_logits() -> None:
    enc, x, z = make(), images(), codes(3, LATENT.tokens)
    with torch.no_grad():
        base = enc.log_prob(x, z).logits
        for pos in range(LATENT.tokens):
            z2 = z.clone()
            z2[:, pos] = (z2[:, pos] + 1) % LATENT.codes
            changed = enc.log_prob(x, z2).logits
            torch.testing.assert_close(changed[:, : pos + 1], base[:, : pos + 1], rtol=0, atol=1e-6)
            per_position = (changed - base).abs().amax(dim=(0, 2))
            assert (per_position[pos + 1 :] > 1e-4).all()


def test_factorised_logq_is_sum_of_independent_tokens() -> None:
    enc, x, z = make(factorised=True), images(), codes(3, LATENT.tokens)
    with torch.no_grad():
        out = enc.log_prob(x, z)
        other = enc.log_prob(x, (z + 1 + codes(3, LATENT.tokens)) % LATENT.codes)
    torch.testing.assert_close(other.logits, out.logits, rtol=0, atol=0)
    per_token = out.logits.gather(-1, z.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.logq, per_token.sum(-1))
    torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(3, LATENT.tokens))
    assert not enc.autoregressive and make().autoregressive


@pytest.mark.parametrize("factorised", [False, True])
def test_q_sums_to_one_over_every_code_sequence(factorised: bool) -> None:
    """Enumerate all V^L sequences of a 2x2 grid of 3 codes: a proper (autoregressive)
    distribution puts total mass 1 on them."""
    image, latent = ImageSpec(3, 4, 4), LatentSpec(grid=(2, 2), codes=3)
    enc = make(factorised, image, latent)
    z_all = torch.tensor(list(itertools.product(range(3), repeat=4)))  # [81, 4]
    x = torch.rand(2, 3, 4, 4)
    with torch.no_grad():
        logq = enc.log_prob(x, z_all[:, None, :].expand(-1, 2, -1)).logq  # [81, 2]
    torch.testing.assert_close(logq.logsumexp(0), torch.zeros(2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("factorised", [False, True])
def test_log_prob_of_k_samples_equals_stacked_calls(factorised: bool) -> None:
    enc, x, z = make(factorised), images(), codes(4, 3, LATENT.tokens)
    with torch.no_grad():
        joint = enc.log_prob(x, z)
        single = [enc.log_prob(x, z[k]) for k in range(4)]
    assert joint.logq.shape == (4, 3) and joint.logits.shape == (4, 3, LATENT.tokens, LATENT.codes)
    torch.testing.assert_close(joint.logq, torch.stack([s.logq for s in single]))
    torch.testing.assert_close(joint.logits, torch.stack([s.logits for s in single]))
    torch.testing.assert_close(joint.entropy, torch.stack([s.entropy for s in single]))
    categorical = torch.distributions.Categorical(logits=joint.logits)
    torch.testing.assert_close(joint.entropy, categorical.entropy())


def test_mode_is_greedy_under_its_own_prefix() -> None:
    enc, x = make(), images()
    z = enc.mode(x)
    assert z.shape == (3, LATENT.tokens)
    with torch.no_grad():
        assert torch.equal(enc.log_prob(x, z).logits.argmax(-1), z)


@pytest.mark.parametrize("factorised", [False, True])
def test_relaxed_sample_rows_are_distributions(factorised: bool) -> None:
    enc, x = make(factorised), images()
    y, logits = enc.relaxed_sample(x, temperature=0.7, hard=False)
    assert y.shape == logits.shape == (3, LATENT.tokens, LATENT.codes)
    torch.testing.assert_close(y.sum(-1), torch.ones(3, LATENT.tokens))
    assert ((y > 0) & (y < 1)).all()


@pytest.mark.parametrize("factorised", [False, True])
def test_relaxed_hard_is_one_hot_with_gradients(factorised: bool) -> None:
    enc, x = make(factorised), images()
    y, logits = enc.relaxed_sample(x, temperature=0.7, hard=True)
    assert ((y == 0) | (y == 1)).all() and (y.sum(-1) == 1).all()
    # The autoregressive head fed back exactly these one-hots: its logits are the teacher-forced
    # logits of the argmax codes.
    with torch.no_grad():
        torch.testing.assert_close(logits, enc.log_prob(x, y.argmax(-1)).logits)
    (y * torch.randn_like(y)).sum().backward()
    for name in ("patches.proj.weight", "head.weight"):
        grad = enc.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    if not factorised:
        assert enc.tokens_in.weight.grad[: LATENT.codes].abs().sum() > 0


def test_relaxed_gradient_flows_through_fed_back_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Gumbel noise the relaxed sampler is a deterministic map; its autograd gradient
    matches central finite differences only if each relaxed token's gradient also flows through
    the later tokens it was fed back into."""
    monkeypatch.setattr(transformer_encoder, "_gumbel_softmax", lambda logp, t, hard: (logp / t).softmax(-1))
    enc, x = make().double(), images().double()
    weights = torch.randn(3, LATENT.tokens, LATENT.codes, dtype=torch.float64)

    def objective() -> Tensor:
        return (enc.relaxed_sample(x, temperature=0.5, hard=False)[0] * weights).sum()

    objective().backward()
    bias, eps = enc.head.bias, 1e-6
    numeric = torch.zeros_like(bias)
    with torch.no_grad():
        for i in range(LATENT.codes):
            bias[i] += eps
            up = objective()
            bias[i] -= 2 * eps
            numeric[i] = (up - objective()) / (2 * eps)
            bias[i] += eps
    torch.testing.assert_close(bias.grad, numeric, rtol=1e-5, atol=1e-7)


def test_log_prob_trains_every_parameter() -> None:
    enc = make()
    enc.log_prob(images(), codes(2, 3, LATENT.tokens)).logq.sum().backward()
    unused = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert unused == []


def test_features_shape() -> None:
    enc = make()
    assert enc.features(images()).shape == (3, LATENT.tokens, enc.feature_dim)
    assert enc.feature_dim == TINY["width"]


def test_patches_are_row_major_and_may_be_rectangular() -> None:
    """Token l sits on patch l: row-major over a 2x3 grid of 2x3-pixel patches."""
    image = ImageSpec(2, 4, 9, mean=(0.5, 0.2), std=(0.5, 0.1))
    enc = make(image=image, latent=LatentSpec(grid=(2, 3), codes=5))
    x = torch.rand(2, *image.shape)
    xs = (x - torch.tensor([0.5, 0.2]).view(2, 1, 1)) / torch.tensor([0.5, 0.1]).view(2, 1, 1)
    patches = [xs[:, :, r * 2 : r * 2 + 2, c * 3 : c * 3 + 3].flatten(1) for r in range(2) for c in range(3)]
    expected = enc.patches.proj(torch.stack(patches, 1)) + enc.patches.pos
    torch.testing.assert_close(enc.patches(x), expected)


def test_bad_grid_and_heads_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="grid of equal patches"):
        TransformerEncoder(image=ImageSpec(3, 10, 10), latent=LatentSpec((4, 4), 8))
    with pytest.raises(ValueError, match="grid of equal patches"):
        TransformerEncoder(image=ImageSpec(3, 8, 18), latent=LatentSpec((4, 4), 8))
    with pytest.raises(ValueError, match="divisible by heads"):
        TransformerEncoder(image=ImageSpec(3, 8, 8), latent=LatentSpec((4, 4), 8), width=10, heads=4)


def expected_parameters(c: int, p: int, length: int, v: int, w: int, depth: int, latent_depth: int) -> int:
    """Closed-form count of the default autoregressive encoder (MLP ratio 4)."""
    mlp = w * 4 * w + 4 * w + 4 * w * w + w
    self_attn = 3 * w * w + w * w + w  # fused qkv without bias, output projection with bias
    cross_attn = w * w + 2 * w * w + w * w + w
    patch = (c * p * p + 1) * w + length * w
    encoder_block = 2 * 2 * w + self_attn + mlp
    decoder_block = 3 * 2 * w + self_attn + cross_attn + mlp
    tokens_in = (v + 1) * w + length * w
    norms = 2 * 2 * w
    head = w * v + v
    return patch + depth * encoder_block + tokens_in + latent_depth * decoder_block + norms + head


def test_imagenet256_shapes_and_parameter_count_on_meta() -> None:
    image, latent = ImageSpec(3, 256, 256), LatentSpec(grid=(32, 32), codes=1024)
    with torch.device("meta"):
        enc = TransformerEncoder(image=image, latent=latent)
        x = torch.empty(2, *image.shape)
        z = torch.empty(4, 2, 1024, dtype=torch.long)
        out = enc.log_prob(x, z)
        feats = enc.features(x)
    assert out.logq.shape == (4, 2) and out.logits.shape == (4, 2, 1024, 1024)
    assert out.entropy.shape == (4, 2, 1024) and feats.shape == (2, 1024, 128)
    count = sum(p.numel() for p in enc.parameters())
    assert count == expected_parameters(3, 8, 1024, 1024, 128, 2, 2) == 1_474_048  # docs/models.md


def test_quickstart_parameter_count() -> None:
    with torch.device("meta"):
        enc = TransformerEncoder(image=ImageSpec(3, 32, 32), latent=LatentSpec(grid=(4, 4), codes=256))
    count = sum(p.numel() for p in enc.parameters())
    assert count == expected_parameters(3, 8, 16, 256, 128, 2, 2) == 1_018_624  # docs/models.md
