"""ghost_norm_sq / ghost_inner and their error bounds against explicit float64 G_i."""

import pytest
import torch
from kernel_oracles import (DEVICE, TOL, TRITON_DTYPES, TWIN_TOL, per_example_grads, randn,
                            rel_err, scaled_err)

from dpfused.kernels import ghost_inner, ghost_inner_bounded, ghost_norm_sq, ghost_norm_sq_bounded
from dpfused.kernels import ghost_norm as mod

# (B, T, m, n): T = 1, odd widths, ragged blocks (17, 33 = 2–3 blocks of 16), width 1.
SHAPES = [(1, 1, 1, 1), (3, 1, 33, 7), (1, 5, 7, 33), (3, 17, 33, 7), (2, 17, 1, 7), (2, 33, 7, 17)]


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ghost_norm_triton_matches_explicit(shape, dtype):
    B, T, m, n = shape
    left, right = randn(B, T, m, dtype=dtype), randn(B, T, n, dtype=dtype)
    expected = per_example_grads(left, right).pow(2).sum(dim=(1, 2))
    out = ghost_norm_sq(left, right, impl="triton")
    assert out.dtype == torch.float32 and out.shape == (B,)
    assert rel_err(out, expected) <= TOL[dtype]
    bounded = ghost_norm_sq_bounded(left, right, impl="triton")
    assert bool(((bounded.value - expected.to(bounded.value.device)).abs() <= bounded.error).all())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ghost_norm_torch_twin_float64(shape):
    B, T, m, n = shape
    left, right = randn(B, T, m, dtype=torch.float64), randn(B, T, n, dtype=torch.float64)
    expected = per_example_grads(left, right).pow(2).sum(dim=(1, 2))
    out = ghost_norm_sq(left, right, impl="torch")
    assert out.dtype == torch.float64
    assert rel_err(out, expected) <= TWIN_TOL


# (B, T1, T2, m, n): the two uses of the weight see different sequence lengths.
INNER_SHAPES = [(1, 1, 5, 7, 3), (3, 17, 4, 33, 7), (2, 5, 20, 1, 9)]


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("shape", INNER_SHAPES, ids=str)
def test_ghost_inner_triton_matches_explicit(shape, dtype):
    B, T1, T2, m, n = shape
    l1, r1 = randn(B, T1, m, dtype=dtype), randn(B, T1, n, dtype=dtype)
    l2, r2 = randn(B, T2, m, dtype=dtype), randn(B, T2, n, dtype=dtype)
    g1, g2 = per_example_grads(l1, r1), per_example_grads(l2, r2)
    expected = (g1 * g2).sum(dim=(1, 2))
    bound = g1.pow(2).sum(dim=(1, 2)).sqrt() * g2.pow(2).sum(dim=(1, 2)).sqrt()  # Cauchy–Schwarz
    assert scaled_err(ghost_inner(l1, r1, l2, r2, impl="triton"), expected, bound) <= TOL[dtype]
    assert scaled_err(ghost_inner(l1, r1, l2, r2, impl="torch"), expected, bound) <= TOL[dtype]


def test_ghost_inner_of_one_use_is_the_norm():
    left, right = randn(2, 9, 5), randn(2, 9, 3)
    assert rel_err(ghost_inner(left, right, left, right, impl="triton"),
                   ghost_norm_sq(left, right, impl="torch")) <= 1e-5


def test_ghost_inner_torch_twin_float64():
    l1, r1 = randn(2, 3, 4, dtype=torch.float64), randn(2, 3, 5, dtype=torch.float64)
    l2, r2 = randn(2, 7, 4, dtype=torch.float64), randn(2, 7, 5, dtype=torch.float64)
    expected = (per_example_grads(l1, r1) * per_example_grads(l2, r2)).sum(dim=(1, 2))
    assert scaled_err(ghost_inner(l1, r1, l2, r2, impl="torch"), expected,
                      expected.abs() + 1.0) <= TWIN_TOL


def test_ghost_norm_strided_inputs_and_other_blocks():
    # Transposed views (non-unit last stride) and a config with BLOCK_T=32, BLOCK_K=16.
    left = randn(2, 7, 37).transpose(1, 2)  # (2, 37, 7)
    right = randn(2, 5, 37).transpose(1, 2)  # (2, 37, 5)
    expected = per_example_grads(left, right).pow(2).sum(dim=(1, 2))
    assert rel_err(ghost_norm_sq(left, right, impl="triton"), expected) <= 1e-5
    estimate = mod._triton_estimate(left, right, left, right, symmetric=True,
                                    config={"BLOCK_T": 32, "BLOCK_K": 16})
    assert rel_err(estimate.value, expected) <= 1e-5


def test_ghost_norm_validates_inputs():
    left = randn(2, 3, 4)
    with pytest.raises(ValueError, match="left"):
        ghost_norm_sq(left[0], randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"right\.shape\[1\]"):
        ghost_norm_sq(left, randn(2, 4, 5))
    with pytest.raises(ValueError, match=r"right\.shape\[0\]"):
        ghost_norm_sq(left, randn(3, 3, 5))
    with pytest.raises(ValueError, match="right"):
        ghost_norm_sq(left, torch.empty(2, 3, 5, device="meta"))
    with pytest.raises(ValueError, match=r"left2\.shape\[2\]"):
        ghost_inner(left, randn(2, 3, 5), randn(2, 6, 3), randn(2, 6, 5))
    with pytest.raises(ValueError, match="float64"):
        ghost_norm_sq(left.double(), randn(2, 3, 5, dtype=torch.float64), impl="triton")
    with pytest.raises(ValueError, match="impl"):
        ghost_norm_sq(left, randn(2, 3, 5), impl="cuda")


def test_ghost_norm_auto_on_cpu_is_torch():
    left, right = randn(2, 3, 4), randn(2, 3, 5)
    if DEVICE == "cpu":
        assert torch.equal(ghost_norm_sq(left, right), ghost_norm_sq(left, right, impl="torch"))


# ---- the error bound holds for crafted inputs (issue 19.1) -------------------------------------
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype,scale,delta", [(torch.float32, 1e6, 2.0 ** -12),
                                               (torch.float64, 1e11, 2.0 ** -27)],
                         ids=["float32", "float64"])
def test_the_bound_covers_catastrophic_cancellation(impl, dtype, scale, delta):
    """Tokens x and −(1−δ)x with |x| huge: the computed ghost value cancels to anything (negative,
    zero, far too small); value + error never falls below the exact squared norm."""
    if impl == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels are fp32/bf16 only")
    torch.manual_seed(0)
    B, m, n = 40, 8, 8
    x = torch.randn(B, 1, n, dtype=torch.float64) * scale
    right = torch.cat([x, -(1 - delta) * x], dim=1).to(dtype)
    left = torch.randn(B, 1, m, dtype=torch.float64).expand(B, 2, m).to(dtype).contiguous()
    exact = per_example_grads(left, right).pow(2).sum(dim=(1, 2))
    estimate = ghost_norm_sq_bounded(left.to(DEVICE), right.to(DEVICE), impl=impl)
    value, error = estimate.value.cpu(), estimate.error.cpu()
    assert bool(((value - exact).abs() <= error).all())
    assert bool((value + error >= exact).all())


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_the_bound_covers_a_cancelling_cross_term(impl):
    """One weight used twice (T = 1 each) with cancelling uses: the cross term's bound holds."""
    torch.manual_seed(1)
    B, m, n = 16, 8, 8
    a = torch.randn(B, 1, n, dtype=torch.float64) * 1e6
    g = torch.randn(B, 1, m, dtype=torch.float64)
    l1, r1 = g.float(), a.float()
    l2, r2 = (-(1 - 2.0 ** -12) * g).float(), a.float()
    exact = (per_example_grads(l1, r1) * per_example_grads(l2, r2)).sum(dim=(1, 2))
    estimate = ghost_inner_bounded(l1, r1, l2, r2, impl=impl)
    assert bool(((estimate.value.cpu() - exact).abs() <= estimate.error.cpu()).all())


def test_the_bound_is_tight_on_ordinary_data():
    """For random tokens the error bound is a tiny fraction of the norm (float32, T = 64)."""
    left, right = randn(4, 64, 48), randn(4, 64, 32)
    exact = per_example_grads(left, right).pow(2).sum(dim=(1, 2))
    for impl in ("triton", "torch"):
        estimate = ghost_norm_sq_bounded(left, right, impl=impl)
        assert float((estimate.error.cpu() / exact).max()) < 1e-3
