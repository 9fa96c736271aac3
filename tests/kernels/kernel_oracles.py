"""Float64 explicit constructions and error measures shared by the kernel tests."""

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="bf16 Triton checks run on CUDA")

# Triton-path dtypes: fp32 everywhere (interpreter on CPU), bf16 on CUDA only.
TRITON_DTYPES = [pytest.param(torch.float32, id="fp32"),
                 pytest.param(torch.bfloat16, id="bf16", marks=[gpu_only, pytest.mark.gpu])]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
TWIN_TOL = 1e-10  # torch twins in float64


def randn(*shape, dtype=torch.float32):
    """Random input on the test device, in `dtype`."""
    return torch.randn(*shape, device=DEVICE).to(dtype)


def per_example_grads(left, right):
    """G_i = Σ_t left[i,t] ⊗ right[i,t] in float64: (B, m, n)."""
    return torch.einsum("btm,btn->bmn", left.double(), right.double())


def embedding_grads(ids, grad, num_embeddings, padding_idx=None):
    """G_i = Σ_t onehot(ids[i,t]) ⊗ grad[i,t] in float64, padding rows zeroed: (B, V, D)."""
    onehot = F.one_hot(ids.long(), num_embeddings).double()
    if padding_idx is not None:
        onehot[..., padding_idx] = 0.0
    return torch.einsum("btv,btd->bvd", onehot, grad.double())


def rel_err(actual, expected) -> float:
    """Largest elementwise |actual − expected| / |expected| (for positive norms)."""
    expected = expected.double().cpu()
    return ((actual.double().cpu() - expected).abs() / expected.abs().clamp_min(1e-30)).max().item()


def scaled_err(actual, expected, scale) -> float:
    """Largest |actual − expected| / scale, for signed quantities bounded by `scale`."""
    diff = (actual.double().cpu() - expected.double().cpu()).abs()
    return (diff / scale.double().cpu().clamp_min(1e-30)).max().item()


def frob_err(actual, expected) -> float:
    """‖actual − expected‖_F / ‖expected‖_F."""
    expected = expected.double().cpu()
    return ((actual.double().cpu() - expected).norm() / expected.norm().clamp_min(1e-30)).item()
