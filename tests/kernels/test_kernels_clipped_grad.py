"""clipped_weight_grad (fused Triton GEMM, scale-then-matmul, torch twin) against float64."""

import pytest
import torch
from kernel_oracles import (TOL, TRITON_DTYPES, TWIN_TOL, frob_err, per_example_grads, randn)

from dpfused.kernels import (choose_clipped_grad_variant, clipped_weight_grad,
                             clipped_weight_grad_scale_matmul)
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
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "SPLIT_K": 3},  # atomics
    {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 1, "SPLIT_K": 1},
], ids=["split3", "split1"])
def test_clipped_grad_split_k_and_grouping(config):
    left, right = randn(3, 23, 37), randn(3, 23, 35)  # 69 rows: ragged splits and K blocks
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
def test_clipped_grad_torch_twin_and_scale_matmul_float64(shape):
    B, T, m, n = shape
    left, right = randn(B, T, m, dtype=torch.float64), randn(B, T, n, dtype=torch.float64)
    scale = torch.rand(B, device=left.device, dtype=torch.float64)
    expected = expected_grad(left, right, scale)
    assert frob_err(clipped_weight_grad(left, right, scale, impl="torch"), expected) <= TWIN_TOL
    assert frob_err(clipped_weight_grad_scale_matmul(left, right, scale), expected) <= TWIN_TOL


def test_scale_matmul_in_place_scales_left():
    left, right = randn(3, 4, 5), randn(3, 4, 6)
    scale = torch.rand(3, device=left.device)
    expected = expected_grad(left, right, scale)
    scaled_left = left * scale.view(3, 1, 1)
    out = clipped_weight_grad_scale_matmul(left, right, scale, inplace=True)
    assert frob_err(out, expected) <= 1e-5
    assert torch.equal(left, scaled_left)


def test_zero_scale_gives_zero_and_variant_choice():
    left, right = randn(2, 5, 7), randn(2, 5, 3)
    out = clipped_weight_grad(left, right, torch.zeros(2, device=left.device), impl="triton")
    assert torch.count_nonzero(out) == 0
    assert choose_clipped_grad_variant(rows=768, cols=3072) == "fused"
    assert choose_clipped_grad_variant(rows=14336, cols=4096) == "fused"  # Llama-8B gate_proj
    assert choose_clipped_grad_variant(rows=4096, cols=14336) == "scale_matmul"  # down_proj


def test_clipped_grad_validates_inputs():
    left, right = randn(2, 3, 4), randn(2, 3, 5)
    with pytest.raises(ValueError, match="scale"):
        clipped_weight_grad(left, right, torch.ones(3))
    with pytest.raises(ValueError, match="scale"):
        clipped_weight_grad(left, right, torch.ones(2, 1))
    with pytest.raises(ValueError, match=r"right\.shape\[0\]"):
        clipped_weight_grad(left, randn(1, 3, 5), torch.ones(2))
