"""VQ and FSQ quantizers: code counts, bijections and nearest-code assignment checked against brute
force or hand computation; the EMA codebook identical across ranks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ngkit
from ngkit.errors import RecipeError


# ---- FSQ (vector-quantize-pytorch's FSQ, plugins/vq_lib.py) -----------------------------------

LEVELS = [3, 4, 5, 6]  # odd and even levels (2 needs the library's preserve_symmetry)
CODES = math.prod(LEVELS)  # 360


def test_fsq_grid_maps_to_exactly_prod_levels_codes() -> None:
    fsq = ngkit.quantizer("fsq", codes=CODES, levels=LEVELS).eval()
    axis = torch.linspace(-4, 4, 17)
    grid = torch.tensor(list(itertools.product(axis.tolist(), repeat=len(LEVELS)))).view(1, -1, 4)
    with torch.no_grad():
        quantized, codes, aux, _ = fsq(grid)
    assert codes.unique().numel() == CODES
    assert codes.min() >= 0 and codes.max() < CODES
    assert aux.item() == 0.0
    # Each channel takes exactly levels[i] values, normalised into [-1, 1].
    for i, n in enumerate(LEVELS):
        assert quantized[..., i].unique().numel() == n
    assert quantized.abs().max() <= 1
    # forward's vectors are the ones its codes stand for.
    torch.testing.assert_close(fsq.codes_to_vectors(codes), quantized)


def test_fsq_index_code_round_trip_is_a_bijection() -> None:
    fsq = ngkit.quantizer("fsq", codes=CODES, levels=LEVELS).eval()
    codes = torch.arange(CODES).view(1, -1)
    vectors = fsq.codes_to_vectors(codes)
    assert vectors[0].unique(dim=0).shape[0] == CODES  # injective on the 360 indices
    assert torch.equal(fsq.module.codes_to_indices(vectors).long(), codes)  # the library's inverse


def test_fsq_levels_must_multiply_to_the_vocabulary() -> None:
    with pytest.raises(RecipeError, match=r"levels = \[8, 5, 5, 5\] give 1000 codes per level but 1024 are needed"):
        ngkit.quantizer("fsq", codes=1024, levels=[8, 5, 5, 5])
    assert ngkit.quantizer("fsq", codes=1000).dim == 4  # the paper's [8, 5, 5, 5]
    assert ngkit.quantizer("fsq", codes=256).dim == 4  # [4, 4, 4, 4]


def test_fsq_straight_through_gradient_is_that_of_the_bound() -> None:
    """Through the quantizer the gradient is that of the smooth tanh bound, as if no rounding."""
    fsq = ngkit.quantizer("fsq", codes=CODES, levels=LEVELS)
    h = torch.randn(3, 2, 4, requires_grad=True)
    (fsq(h)[0] * torch.arange(4.0)).sum().backward()
    h2 = h.detach().requires_grad_()
    bounded = fsq.module.bound(h2)  # tanh bound, rounded straight-through, scaled to [-1, 1]
    (bounded * torch.arange(4.0)).sum().backward()
    torch.testing.assert_close(h.grad, h2.grad)


# ---- VQ (vector-quantize-pytorch's VectorQuantize, plugins/vq_lib.py) ------------------------------


def test_vq_assigns_the_nearest_code() -> None:
    torch.manual_seed(0)
    vq = ngkit.quantizer("vq", codes=16, dim=3).eval()
    h = torch.randn(4, 5, 3)
    with torch.no_grad():
        quantized, codes, _, _ = vq(h)
    book = vq.module.codebook.detach()
    for b, l in itertools.product(range(4), range(5)):
        distances = [float(((h[b, l] - book[c]) ** 2).sum()) for c in range(16)]
        assert codes[b, l] == min(range(16), key=distances.__getitem__)
    torch.testing.assert_close(quantized, book[codes])
    torch.testing.assert_close(vq.codes_to_vectors(codes), quantized)


def _distributed_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same initial codebook on both ranks
    vq = ngkit.quantizer("vq", codes=4, dim=2)
    start = vq.module.codebook.detach().clone()
    torch.manual_seed(1 + rank)  # different data on each rank
    vq(torch.randn(1, 6, 2))  # a training forward moves the EMA codebook
    torch.save({"start": start, "codebook": vq.module.codebook.detach()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_vq_ema_codebook_stays_identical_across_ranks(tmp_path) -> None:
    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert not torch.equal(r0["codebook"], r0["start"])
    torch.testing.assert_close(r0["codebook"], r1["codebook"])
