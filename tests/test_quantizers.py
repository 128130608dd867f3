"""VQ and FSQ quantizers: code counts, bijections, nearest-code assignment, losses and EMA updates
checked against brute force or hand computation; EMA/restart state identical across ranks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ngkit.components import LatentSpec
from ngkit_plugins.quantizers import LAPLACE_EPS, FiniteScalarQuantizer, VectorQuantizer, round_ste


def latent(codes: int, tokens: int = 2) -> LatentSpec:
    return LatentSpec((1, tokens), codes)


# ---- FSQ ----------------------------------------------------------------------------------------

LEVELS = (2, 3, 4, 5)  # odd and even levels, including the smallest (2)


def test_fsq_grid_maps_to_exactly_prod_levels_codes() -> None:
    fsq = FiniteScalarQuantizer(latent(120), LEVELS)
    axis = torch.linspace(-4, 4, 17)
    grid = torch.tensor(list(itertools.product(axis.tolist(), repeat=len(LEVELS)))).view(1, -1, 4)
    quantized, codes, aux, _ = fsq(grid)
    assert codes.unique().numel() == math.prod(LEVELS) == 120
    assert codes.min() >= 0 and codes.max() < 120
    assert aux.item() == 0.0
    # Each channel takes exactly levels[i] values, normalised into [-1, 1].
    for i, n in enumerate(LEVELS):
        assert quantized[..., i].unique().numel() == n
    assert quantized.abs().max() <= 1
    # forward's vectors are the ones its codes stand for.
    torch.testing.assert_close(fsq.codes_to_vectors(codes), quantized)


def test_fsq_index_code_round_trip_is_a_bijection() -> None:
    fsq = FiniteScalarQuantizer(latent(120), LEVELS)
    codes = torch.arange(120)
    vectors = fsq.codes_to_vectors(codes)
    assert vectors.unique(dim=0).shape[0] == 120  # injective on the 120 indices
    assert torch.equal(fsq.vectors_to_codes(vectors), codes)


def test_fsq_levels_must_multiply_to_the_vocabulary() -> None:
    with pytest.raises(ValueError, match=r"give 1000 codes but the latent has 1024.*product is 1024"):
        FiniteScalarQuantizer(latent(1024), (8, 5, 5, 5))
    assert FiniteScalarQuantizer(latent(1000), (8, 5, 5, 5)).dim == 4


def test_fsq_straight_through_gradient_is_identity() -> None:
    z = torch.linspace(-3, 3, 25, requires_grad=True)
    rounded = round_ste(z)
    torch.testing.assert_close(rounded, z.detach().round())
    rounded.backward(torch.arange(25.0))
    torch.testing.assert_close(z.grad, torch.arange(25.0))  # upstream gradient passes unchanged
    # Through the whole quantizer the gradient is that of the smooth bound, as if no rounding.
    fsq = FiniteScalarQuantizer(latent(120), LEVELS)
    h = torch.randn(3, 2, 4, requires_grad=True)
    (fsq(h)[0] * torch.arange(4.0)).sum().backward()
    h2 = h.detach().requires_grad_()
    (fsq.bound(h2) / (fsq.levels // 2) * torch.arange(4.0)).sum().backward()
    torch.testing.assert_close(h.grad, h2.grad)


# ---- VQ -----------------------------------------------------------------------------------------


def test_vq_assigns_the_nearest_code() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(latent(16, tokens=5), dim=3)
    h = torch.randn(4, 5, 3)
    quantized, codes, _, _ = vq(h)
    book = vq.codebook.detach()
    for b, l in itertools.product(range(4), range(5)):
        distances = [float(((h[b, l] - book[c]) ** 2).sum()) for c in range(16)]
        assert codes[b, l] == min(range(16), key=distances.__getitem__)
    torch.testing.assert_close(quantized, book[codes])
    torch.testing.assert_close(vq.codes_to_vectors(codes), quantized)


def _hand_vq(**options: object) -> tuple[VectorQuantizer, torch.Tensor]:
    vq = VectorQuantizer(latent(2), dim=2, commitment=0.25, **options)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    # image 1 -> codes (0, 1), squared errors 0.05 + 0.05; image 2 -> codes (0, 0), 0.65 + 0
    h = torch.tensor([[[0.2, 0.1], [0.9, 1.2]], [[0.8, 0.1], [0.0, 0.0]]], requires_grad=True)
    return vq, h


def test_vq_losses_and_gradients_match_hand_computation() -> None:
    vq, h = _hand_vq()
    quantized, codes, aux, logs = vq(h)
    assert codes.tolist() == [[0, 1], [0, 0]]
    # Per-image sums of squared errors averaged over the 2 images: (0.1 + 0.65) / 2 = 0.375.
    assert logs["vq_codebook"] == pytest.approx(0.375)
    assert logs["vq_commitment"] == pytest.approx(0.25 * 0.375)
    assert aux.item() == pytest.approx(1.25 * 0.375)
    e = vq.codebook.detach()[codes]
    upstream = torch.randn_like(h)
    ((quantized * upstream).sum() + aux).backward()
    # straight-through upstream gradient + commitment 2 * 0.25 * (h - e) / B
    torch.testing.assert_close(h.grad, upstream + 0.25 * (h.detach() - e))
    # codebook: 2 (e - h) / B summed over the vectors assigned to each code
    expected = torch.zeros(2, 2).index_add_(0, codes.flatten(), (e - h.detach()).view(-1, 2))
    torch.testing.assert_close(vq.codebook.grad, expected)


def test_vq_ema_update_matches_hand_computation() -> None:
    vq = VectorQuantizer(latent(2, tokens=3), dim=1, ema=True, decay=0.9)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0], [10.0]]))
        vq.ema_sum.copy_(vq.codebook)
    assert "codebook" not in dict(vq.named_parameters())
    _, codes, aux, logs = vq(torch.tensor([[[1.0], [2.0], [9.0]]]))
    assert codes.tolist() == [[0, 0, 1]] and set(logs) == {"vq_commitment"}
    assert aux.item() == pytest.approx(0.25 * (1 + 4 + 1))  # commitment only
    vq.after_step()
    # counts 0.9 * 1 + 0.1 * (2, 1); sums 0.9 * (0, 10) + 0.1 * (1 + 2, 9); Laplace-smoothed counts
    count = torch.tensor([1.1, 1.0])
    smoothed = (count + LAPLACE_EPS) / (2.1 + 2 * LAPLACE_EPS) * 2.1
    torch.testing.assert_close(vq.ema_count, count)
    torch.testing.assert_close(vq.codebook.squeeze(1), torch.tensor([0.3, 9.9]) / smoothed)
    assert vq.step_count.sum() == 0  # batch statistics consumed
    vq.eval()
    with torch.no_grad():
        vq(torch.tensor([[[1.0], [2.0], [9.0]]]))
    assert vq.step_count.sum() == 0  # evaluation does not feed the EMA


def test_vq_restarts_dead_codes_from_recent_encoder_outputs() -> None:
    vq = VectorQuantizer(latent(3, tokens=2), dim=2, restart_dead=True, restart_after=2)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0]]))
    h = torch.tensor([[[0.1, 0.0], [0.9, 1.0]]])
    vq(h)
    assert vq.after_step() == {"vq_restarted": 0.0}
    vq(h)
    assert vq.after_step() == {"vq_restarted": 1.0}
    assert any(torch.equal(vq.codebook[2].detach(), row) for row in h[0])
    torch.testing.assert_close(vq.codebook[:2].detach(), torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert vq.idle_steps.tolist() == [0, 0, 0]


def _distributed_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different data and different restart draws on each rank
    vq = VectorQuantizer(latent(4, tokens=3), dim=1, ema=True, decay=0.5, restart_dead=True, restart_after=1)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0], [1.0], [2.0], [50.0]]))
        vq.ema_sum.copy_(vq.codebook)
    vq(torch.tensor([[[0.1], [1.1], [2.2]]]) + rank * 0.1)
    logs = vq.after_step()
    torch.save({"codebook": vq.codebook, "logs": logs}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_vq_ema_and_restarts_stay_identical_across_ranks(tmp_path) -> None:
    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["logs"] == r1["logs"] == {"vq_restarted": 1.0}
    torch.testing.assert_close(r0["codebook"], r1["codebook"])
    # The EMA used both ranks' assignments: code 0 saw 0.1 and 0.2 -> (0.5*0 + 0.5*0.3) / N.
    count = 0.5 + 0.5 * 2
    total = 3 * (0.5 + 0.5 * 2) + 0.5
    smoothed = (count + LAPLACE_EPS) / (total + 4 * LAPLACE_EPS) * total
    assert r0["codebook"][0].item() == pytest.approx(0.15 / smoothed)
    # The dead code 3 was replaced by one of rank 0's encoder outputs.
    assert any(r0["codebook"][3].item() == pytest.approx(v) for v in (0.1, 1.1, 2.2))
