"""Embedding norm, tied embedding/LM-head cross term and clipped embedding gradient vs float64."""

import pytest
import torch
from kernel_oracles import (DEVICE, TOL, TRITON_DTYPES, TWIN_TOL, embedding_grads, frob_err,
                            per_example_grads, randn, rel_err, scaled_err)

from dpfused.kernels import embedding_clipped_grad, embedding_dense_inner, embedding_norm_sq

# (B, T, D, V, padding_idx): small vocabularies force repeated ids; T = 33 spans three 16-blocks.
CASES = [(1, 1, 1, 3, None), (3, 5, 7, 4, 1), (2, 17, 33, 5, 0), (3, 33, 9, 6, None),
         (1, 17, 5, 2, 1)]


def make_ids(B, T, V):
    return torch.randint(0, V, (B, T), device=DEVICE)


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_embedding_norm_triton_matches_explicit(case, dtype):
    B, T, D, V, pad = case
    ids, grad = make_ids(B, T, V), randn(B, T, D, dtype=dtype)
    expected = embedding_grads(ids, grad, V, pad).pow(2).sum(dim=(1, 2))
    out = embedding_norm_sq(ids, grad, padding_idx=pad, impl="triton")
    assert out.dtype == torch.float32 and out.shape == (B,)
    assert scaled_err(out, expected, expected + 1e-3) <= TOL[dtype]  # all-padding rows give 0


@pytest.mark.parametrize("case", CASES, ids=str)
def test_embedding_norm_torch_twin_float64(case):
    B, T, D, V, pad = case
    ids, grad = make_ids(B, T, V), randn(B, T, D, dtype=torch.float64)
    expected = embedding_grads(ids, grad, V, pad).pow(2).sum(dim=(1, 2))
    out = embedding_norm_sq(ids, grad, padding_idx=pad, impl="torch")
    assert out.dtype == torch.float64
    assert scaled_err(out, expected, expected + 1e-3) <= TWIN_TOL


def test_embedding_norm_all_padding_and_distinct_ids():
    grad = randn(2, 20, 3)
    ids = torch.full((2, 20), 7, device=DEVICE)
    for impl in ("triton", "torch"):
        assert torch.count_nonzero(embedding_norm_sq(ids, grad, padding_idx=7, impl=impl)) == 0
    distinct = torch.arange(40, device=DEVICE).view(2, 20)  # no repeats: Σ_t ‖g_t‖²
    expected = grad.double().pow(2).sum(dim=(1, 2))
    assert rel_err(embedding_norm_sq(distinct, grad, impl="triton"), expected) <= 1e-5


# (B, T, S, D, V, padding_idx): embedding length T and head length S differ.
DENSE_CASES = [(1, 1, 1, 1, 3, None), (3, 5, 17, 7, 4, 1), (2, 17, 6, 33, 5, 0)]


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("case", DENSE_CASES, ids=str)
def test_embedding_dense_inner_matches_explicit(case, dtype):
    B, T, S, D, V, pad = case
    ids, grad_e = make_ids(B, T, V), randn(B, T, D, dtype=dtype)
    left, right = randn(B, S, V, dtype=dtype), randn(B, S, D, dtype=dtype)
    g_e = embedding_grads(ids, grad_e, V, pad)  # (B, V, D)
    g_h = per_example_grads(left, right)  # (B, V, D)
    expected = (g_e * g_h).sum(dim=(1, 2))
    bound = g_e.pow(2).sum(dim=(1, 2)).sqrt() * g_h.pow(2).sum(dim=(1, 2)).sqrt() + 1e-3
    out = embedding_dense_inner(ids, grad_e, left, right, padding_idx=pad, impl="triton")
    assert out.dtype == torch.float32 and out.shape == (B,)
    assert scaled_err(out, expected, bound) <= TOL[dtype]
    twin = embedding_dense_inner(ids, grad_e.double(), left.double(), right.double(),
                                 padding_idx=pad, impl="torch")
    assert scaled_err(twin, expected, bound) <= TWIN_TOL


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_embedding_clipped_grad_matches_explicit(case, dtype):
    B, T, D, V, pad = case
    ids, grad = make_ids(B, T, V), randn(B, T, D, dtype=dtype)
    scale = torch.rand(B, device=DEVICE)
    expected = torch.einsum("b,bvd->vd", scale.double(), embedding_grads(ids, grad, V, pad))
    out = embedding_clipped_grad(ids, grad, scale, num_embeddings=V, padding_idx=pad,
                                 impl="triton")
    assert out.dtype == torch.float32 and out.shape == (V, D)
    assert frob_err(out, expected) <= TOL[dtype]
    if pad is not None:
        assert torch.count_nonzero(out[pad]) == 0
    twin = embedding_clipped_grad(ids, grad.double(), scale.double(), num_embeddings=V,
                                  padding_idx=pad, impl="torch")
    assert frob_err(twin, expected) <= TWIN_TOL


def test_embedding_validates_inputs():
    ids, grad = make_ids(2, 3, 5), randn(2, 3, 4)
    with pytest.raises(ValueError, match="ids"):
        embedding_norm_sq(ids.float(), grad)
    with pytest.raises(ValueError, match=r"grad\.shape\[1\]"):
        embedding_norm_sq(ids, randn(2, 4, 4))
    with pytest.raises(ValueError, match="padding_idx"):
        embedding_norm_sq(ids, grad, padding_idx=-1)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 5\)"):
        embedding_clipped_grad(ids + 3, grad, torch.ones(2), num_embeddings=5)
    with pytest.raises(ValueError, match="num_embeddings"):
        embedding_clipped_grad(ids, grad, torch.ones(2), num_embeddings=0)
    with pytest.raises(ValueError, match=r"right\.shape\[2\]"):
        embedding_dense_inner(ids, grad, randn(2, 6, 5), randn(2, 6, 3))
    with pytest.raises(ValueError, match="padding_idx"):
        embedding_dense_inner(ids, grad, randn(2, 6, 5), randn(2, 6, 4), padding_idx=5)
