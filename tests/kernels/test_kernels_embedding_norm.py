"""Embedding norm, tied embedding/LM-head cross term and clipped embedding gradient vs float64.

The embedding ops run one exact grouped form on every device (rows of each (example, id) summed
first, in float64): no `impl` to choose. The attack cases are those of issue 26 (items 1 and 2).
"""

import pytest
import torch
from kernel_oracles import (DEVICE, TWIN_TOL, embedding_grads, frob_err, per_example_grads,
                            randn, scaled_err)

from dpfused.kernels import (embedding_clipped_grad, embedding_dense_inner_bounded,
                             embedding_norm_sq)

# (B, T, D, V, padding_idx): small vocabularies force repeated ids; T = 33 spans three 16-blocks.
CASES = [(1, 1, 1, 3, None), (3, 5, 7, 4, 1), (2, 17, 33, 5, 0), (3, 33, 9, 6, None),
         (1, 17, 5, 2, 1)]
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-6, torch.float64: TWIN_TOL}


def make_ids(B, T, V):
    return torch.randint(0, V, (B, T), device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_embedding_norm_matches_explicit(case, dtype):
    B, T, D, V, pad = case
    ids, grad = make_ids(B, T, V), randn(B, T, D, dtype=dtype)
    expected = embedding_grads(ids, grad, V, pad).pow(2).sum(dim=(1, 2))
    out = embedding_norm_sq(ids, grad, padding_idx=pad)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == (B,)
    assert scaled_err(out, expected, expected + 1e-3) <= TOL[dtype]  # all-padding rows give 0


def test_embedding_norm_all_padding_and_distinct_ids():
    grad = randn(2, 20, 3)
    ids = torch.full((2, 20), 7, device=DEVICE)
    assert torch.count_nonzero(embedding_norm_sq(ids, grad, padding_idx=7)) == 0
    distinct = torch.arange(40, device=DEVICE).view(2, 20)  # no repeats: Σ_t ‖g_t‖²
    expected = grad.double().pow(2).sum(dim=(1, 2))
    assert scaled_err(embedding_norm_sq(distinct, grad), expected, expected) <= 1e-6


def test_embedding_norm_of_a_cancelling_id_is_exact():
    """Issue 26.2: g and −(1−δ)g on one id. The Gram form Σ 1[x_t = x_s] g_t·g_s returned 0 where
    the norm is δ‖g‖ (the Triton kernel on CUDA); the grouped form sums the rows first."""
    g = torch.randn(1, 1, 64, dtype=torch.float64) * 1e4
    grad = torch.cat([g, -(1 - 1e-4) * g], dim=1).float()  # the rows as float32 holds them
    ids = torch.tensor([[3, 3]])
    exact = (grad[0, 0].double() + grad[0, 1].double()).pow(2).sum()
    assert exact > 1.0
    assert scaled_err(embedding_norm_sq(ids, grad), exact.view(1), exact.view(1)) <= 1e-6


# (B, T, S, D, V, padding_idx): embedding length T and head length S differ.
DENSE_CASES = [(1, 1, 1, 1, 3, None), (3, 5, 17, 7, 4, 1), (2, 17, 6, 33, 5, 0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DENSE_CASES, ids=str)
def test_embedding_dense_inner_matches_explicit_within_its_bound(case, dtype):
    B, T, S, D, V, pad = case
    ids, grad_e = make_ids(B, T, V), randn(B, T, D, dtype=dtype)
    left, right = randn(B, S, V, dtype=dtype), randn(B, S, D, dtype=dtype)
    g_e = embedding_grads(ids, grad_e, V, pad)  # (B, V, D)
    g_h = per_example_grads(left, right)  # (B, V, D)
    expected = (g_e * g_h).sum(dim=(1, 2))
    bound = g_e.pow(2).sum(dim=(1, 2)).sqrt() * g_h.pow(2).sum(dim=(1, 2)).sqrt() + 1e-3
    out = embedding_dense_inner_bounded(ids, grad_e, left, right, padding_idx=pad)
    assert out.value.dtype == torch.float64 and out.value.shape == (B,)
    assert scaled_err(out.value, expected, bound) <= TOL[dtype]
    assert bool(((out.value - expected).abs() <= out.error + 1e-300).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_embedding_clipped_grad_matches_explicit(case, dtype):
    B, T, D, V, pad = case
    ids, grad = make_ids(B, T, V), randn(B, T, D, dtype=dtype)
    scale = torch.rand(B, device=DEVICE)
    expected = torch.einsum("b,bvd->vd", scale.double(), embedding_grads(ids, grad, V, pad))
    out = embedding_clipped_grad(ids, grad, scale, num_embeddings=V, padding_idx=pad)
    assert out.shape == (V, D)
    assert frob_err(out, expected) <= TOL[dtype]
    if pad is not None:
        assert torch.count_nonzero(out[pad]) == 0


def test_a_cancelling_example_cannot_absorb_the_others_rows():
    """Issue 26.1: an example putting +M·a and −M·a on one id has gradient 0; added row by row into
    the shared table row, +M wiped out in float32 what other examples had added to it."""
    B, D, V = 8, 16, 5
    ids = torch.full((B, 4), 3, dtype=torch.long)  # every example writes row 3
    grad = torch.randn(B, 4, D)
    a = torch.randn(D)
    attacker_ids = torch.tensor([[3, 3, 0, 0]])
    attacker_grad = torch.stack([1e10 * a, -1e10 * a, torch.zeros(D), torch.zeros(D)])[None]
    scale = torch.ones(B + 1)
    without = embedding_clipped_grad(ids, grad, scale[:B], num_embeddings=V)
    together = embedding_clipped_grad(torch.cat([ids, attacker_ids]),  # after the others
                                      torch.cat([grad, attacker_grad]), scale, num_embeddings=V)
    assert (together.double() - without.double()).norm() <= 1e-5 * without.double().norm()


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
        embedding_dense_inner_bounded(ids, grad, randn(2, 6, 5), randn(2, 6, 3))
    with pytest.raises(ValueError, match="padding_idx"):
        embedding_dense_inner_bounded(ids, grad, randn(2, 6, 5), randn(2, 6, 4), padding_idx=5)
