"""clipped_weight_grad (Triton kernel and torch twin) against float64, and its per-example order."""

import pytest
import torch
from kernel_oracles import (DEVICE, TOL, TRITON_DTYPES, TWIN_TOL, frob_err, per_example_grads,
                            randn)

from dpfused.kernels import clipped_weight_grad, split_scale
from dpfused.kernels import clipped_grad as mod

SHAPES = [(1, 1, 1, 1), (3, 1, 33, 7), (1, 5, 7, 33), (3, 17, 33, 7), (2, 17, 1, 33)]


def expected_grad(left, right, scale):
    return torch.einsum("b,bmn->mn", scale.double(), per_example_grads(left, right))


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_clipped_grad_triton_matches_explicit(shape, dtype):
    B, T, m, n = shape
    left, right = randn(B, T, m, dtype=dtype), randn(B, T, n, dtype=dtype)
    scale = torch.rand(B, device=left.device)
    out = clipped_weight_grad(left, right, scale, impl="triton")
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert frob_err(out, expected_grad(left, right, scale)) <= TOL[dtype]


@pytest.mark.parametrize("config", [
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "SPLIT_B": 2},  # atomics
    {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 1, "SPLIT_B": 1},
], ids=["split2", "split1"])
def test_clipped_grad_example_splits_and_grouping(config):
    left, right = randn(3, 23, 37), randn(3, 23, 35)  # ragged example splits and T blocks
    scale = torch.rand(3, device=left.device)
    out = mod._launch(left, right, scale, config=config)
    assert frob_err(out, expected_grad(left, right, scale)) <= 1e-5


def test_clipped_grad_strided_inputs():
    left = randn(2, 9, 17).transpose(1, 2)  # (2, 17, 9)
    right = randn(17, 2, 6).transpose(0, 1)  # (2, 17, 6), batch not outermost in memory
    scale = torch.rand(2, device=left.device)
    out = clipped_weight_grad(left, right, scale, impl="triton")
    assert frob_err(out, expected_grad(left, right, scale)) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_clipped_grad_torch_twin_float64(shape):
    B, T, m, n = shape
    left, right = randn(B, T, m, dtype=torch.float64), randn(B, T, n, dtype=torch.float64)
    scale = torch.rand(B, device=left.device, dtype=torch.float64)
    expected = expected_grad(left, right, scale)
    assert frob_err(clipped_weight_grad(left, right, scale, impl="torch"), expected) <= TWIN_TOL


def test_zero_scale_gives_zero():
    left, right = randn(2, 5, 7), randn(2, 5, 3)
    out = clipped_weight_grad(left, right, torch.zeros(2, device=left.device), impl="triton")
    assert torch.count_nonzero(out) == 0


def test_split_scale_is_an_exact_power_of_two_and_a_rest():
    scale = torch.tensor([1.0, 0.75, 3e-30, 0.0, 1e-300], dtype=torch.float64)
    pow2, rest = split_scale(scale)
    mantissa, _ = torch.frexp(pow2)
    assert bool((mantissa == 0.5).all())  # powers of two
    assert bool(((rest >= 1) & (rest < 2) | (scale == 0)).all())
    assert torch.equal(pow2 * rest, scale)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("batch", [8, 64])
def test_one_example_cannot_erase_the_others(impl, batch):
    """Issue 25.1: an example whose two tokens carry +M·u⊗v and −M·u⊗v has G_i = 0 and clip factor 1;
    in one GEMM over all B·T rows the rows before it were absorbed by +M and erased by −M (shift
    up to (B − 1)·C). Reduced example by example, the others' sum is untouched."""
    torch.manual_seed(0)
    T, m, n = 2, 4, 4
    left, right = randn(batch, T, m), randn(batch, T, n)
    u, v = torch.randn(m, device=DEVICE), torch.randn(n, device=DEVICE)
    attacker_left = torch.stack([1e12 * u, -1e12 * u])[None]
    attacker_right = torch.stack([v, v])[None]
    without = clipped_weight_grad(left, right, torch.ones(batch, device=DEVICE), impl=impl)
    together = clipped_weight_grad(torch.cat([left, attacker_left]),
                                   torch.cat([right, attacker_right]),
                                   torch.ones(batch + 1, device=DEVICE), impl=impl)
    assert frob_err(together, without.double()) <= 1e-6


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_a_huge_example_with_a_tiny_factor_does_not_overflow(impl):
    """Entries near float32's range (finite): the example's clip factor is tiny, and its rows are
    scaled (by a power of two, exactly) before its tokens are added, so nothing overflows."""
    left, right = randn(3, 4, 5), randn(3, 4, 6)
    left[1] *= 1e19
    right[1] *= 1e19
    scale = torch.tensor([1.0, 1e-40, 1.0], dtype=torch.float64, device=DEVICE)
    out = clipped_weight_grad(left, right, scale, impl=impl)
    assert bool(torch.isfinite(out).all())
    assert frob_err(out, expected_grad(left, right, scale)) <= 1e-5


def test_clipped_grad_validates_inputs():
    left, right = randn(2, 3, 4), randn(2, 3, 5)
    with pytest.raises(ValueError, match="scale"):
        clipped_weight_grad(left, right, torch.ones(3))
    with pytest.raises(ValueError, match="scale"):
        clipped_weight_grad(left, right, torch.ones(2, 1))
    with pytest.raises(ValueError, match=r"right\.shape\[0\]"):
        clipped_weight_grad(left, randn(1, 3, 5), torch.ones(2))
