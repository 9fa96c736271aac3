"""direct_norm_sq against explicit float64 G_i."""

import pytest
import torch
from kernel_oracles import TOL, TRITON_DTYPES, TWIN_TOL, per_example_grads, randn, rel_err

from dpfused.kernels import direct_norm_sq, ghost_norm_sq
from dpfused.kernels import direct_norm as mod

# (B, T, m, n): T = 1, odd widths, tiles that straddle the 16-wide blocks, widths of 1.
SHAPES = [(1, 1, 1, 1), (3, 1, 33, 7), (1, 5, 7, 33), (3, 17, 33, 7), (2, 17, 1, 33),
          (1, 33, 17, 1)]


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_direct_norm_triton_matches_explicit(shape, dtype):
    B, T, m, n = shape
    left, right = randn(B, T, m, dtype=dtype), randn(B, T, n, dtype=dtype)
    expected = per_example_grads(left, right).pow(2).sum(dim=(1, 2))
    out = direct_norm_sq(left, right, impl="triton")
    assert out.dtype == torch.float32 and out.shape == (B,)
    assert rel_err(out, expected) <= TOL[dtype]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_direct_norm_torch_twin_float64(shape):
    B, T, m, n = shape
    left, right = randn(B, T, m, dtype=torch.float64), randn(B, T, n, dtype=torch.float64)
    expected = per_example_grads(left, right).pow(2).sum(dim=(1, 2))
    out = direct_norm_sq(left, right, impl="torch")
    assert out.dtype == torch.float64
    assert rel_err(out, expected) <= TWIN_TOL


def test_direct_and_ghost_agree():
    left, right = randn(3, 20, 9), randn(3, 20, 11)
    assert rel_err(direct_norm_sq(left, right, impl="triton"),
                   ghost_norm_sq(left, right, impl="triton")) <= 1e-5


def test_direct_norm_strided_inputs_and_other_tiles():
    left = randn(2, 19, 21).transpose(1, 2)  # (2, 21, 19), non-unit last stride
    right = randn(2, 21, 23)[:, :, ::2]  # (2, 21, 12), stride 2 along n
    expected = per_example_grads(left, right).pow(2).sum(dim=(1, 2))
    assert rel_err(direct_norm_sq(left, right, impl="triton"), expected) <= 1e-5
    out = mod._launch(left, right, config={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_T": 32})
    assert rel_err(out, expected) <= 1e-5


def test_direct_norm_validates_inputs():
    with pytest.raises(ValueError, match="right"):
        direct_norm_sq(randn(2, 3, 4), randn(2, 3))
    with pytest.raises(ValueError, match=r"right\.shape\[1\]"):
        direct_norm_sq(randn(2, 3, 4), randn(2, 5, 4))
    with pytest.raises(ValueError, match="left"):
        direct_norm_sq(torch.zeros(2, 3, 4, dtype=torch.int64), randn(2, 3, 4))
