"""norm_layer_backward against torch.autograd in float64 with per-example affine parameters."""

import pytest
import torch
import torch.nn.functional as F
from kernel_oracles import TOL, TRITON_DTYPES, TWIN_TOL, frob_err, randn

from dpfused.kernels import norm_layer_backward
from dpfused.kernels import norm_layers as mod


def autograd_reference(x, grad_out, weight, normalized_shape, eps, rms, has_bias):
    """float64 autograd with the affine parameters expanded per example, so that their .grad is
    the per-example gradient."""
    x = x.double().detach().requires_grad_()
    B, k = x.shape[0], len(normalized_shape)
    param_shape = (B,) + (1,) * (x.dim() - 1 - k) + tuple(normalized_shape)
    if rms:  # manual RMSNorm, as HF LlamaRMSNorm computes it (in float64 here)
        dims = tuple(range(-k, 0))
        y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    else:
        y = F.layer_norm(x, normalized_shape, None, None, eps)
    w = b = None
    if weight is not None:
        w = weight.double().expand(param_shape).clone().requires_grad_()
        y = y * w
        if has_bias:
            b = torch.zeros(param_shape, dtype=torch.float64, device=x.device, requires_grad=True)
            y = y + b
    y.backward(grad_out.double())
    per_example = lambda p: None if p is None else p.grad.reshape(B, *normalized_shape)  # noqa
    return x.grad, per_example(w), per_example(b)


# (x shape, normalized_shape, rms, affine, has_bias)
CASES = [
    ((3, 5, 7), (7,), False, True, True),  # LayerNorm
    ((1, 17, 33), (33,), False, True, False),  # LayerNorm(bias=False)
    ((3, 17, 9), (9,), False, False, False),  # no elementwise_affine
    ((2, 3, 4, 5), (4, 5), False, True, True),  # 2-D normalized_shape
    ((3, 1), (1,), False, True, True),  # 2-D input, width 1
    ((1, 33), (33,), True, True, False),  # RMSNorm on 2-D input
    ((2, 17, 6), (6,), True, True, False),  # RMSNorm
    ((2, 4, 3, 5), (5,), True, False, False),  # RMSNorm, no weight, two middle dims
]


def check(out, ref, tol, x):
    grad_input, grad_weight, grad_bias = out
    ref_input, ref_weight, ref_bias = ref
    assert grad_input.shape == x.shape and grad_input.dtype == x.dtype
    assert frob_err(grad_input, ref_input) <= tol
    for got, want in ((grad_weight, ref_weight), (grad_bias, ref_bias)):
        if want is None:
            assert got is None
        else:
            assert got.shape == want.shape
            assert frob_err(got, want) <= tol


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_norm_backward_triton_matches_autograd(case, dtype):
    shape, ns, rms, affine, has_bias = case
    x = (randn(*shape) * 2.0 + 0.5).to(dtype)
    grad_out = randn(*shape, dtype=dtype)
    weight = randn(*ns) if affine else None
    out = norm_layer_backward(x, grad_out, weight, normalized_shape=ns, eps=1e-5, rms=rms,
                              has_bias=has_bias, impl="triton")
    ref = autograd_reference(x, grad_out, weight, ns, 1e-5, rms, has_bias)
    check(out, ref, TOL[dtype] * (1 if dtype == torch.float32 else 2), x)
    if out[1] is not None:
        assert out[1].dtype == torch.float32


@pytest.mark.parametrize("case", CASES, ids=str)
def test_norm_backward_torch_twin_float64(case):
    shape, ns, rms, affine, has_bias = case
    x = randn(*shape, dtype=torch.float64) * 2.0 + 0.5
    grad_out = randn(*shape, dtype=torch.float64)
    weight = randn(*ns, dtype=torch.float64) if affine else None
    out = norm_layer_backward(x, grad_out, weight, normalized_shape=ns, eps=1e-5, rms=rms,
                              has_bias=has_bias, impl="torch")
    check(out, autograd_reference(x, grad_out, weight, ns, 1e-5, rms, has_bias), TWIN_TOL, x)


@pytest.mark.parametrize("rms", [False, True])
def test_norm_backward_row_chunks(rms):
    # Several programs per example, each looping over several row tiles (some ragged).
    x, grad_out, weight = randn(2, 23, 10), randn(2, 23, 10), randn(10)
    out = mod._launch(x, grad_out, weight, normalized_shape=(10,), eps=1e-6, rms=rms,
                      has_bias=not rms, config={"BLOCK_R": 2, "ROWS_PER_PROG": 6})
    check(out, autograd_reference(x, grad_out, weight, (10,), 1e-6, rms, not rms), 1e-5, x)


def test_norm_backward_int_normalized_shape_and_validation():
    x, grad_out, weight = randn(2, 3, 4), randn(2, 3, 4), randn(4)
    out = norm_layer_backward(x, grad_out, weight, normalized_shape=4, eps=1e-5, rms=False,
                              has_bias=True, impl="triton")
    assert out[1].shape == (2, 4) and out[2].shape == (2, 4)
    kwargs = dict(eps=1e-5, rms=False, has_bias=False)
    with pytest.raises(ValueError, match="x must have shape"):
        norm_layer_backward(x, grad_out, weight, normalized_shape=(3, 5), **kwargs)
    with pytest.raises(ValueError, match="x must have shape"):  # no batch dimension
        norm_layer_backward(x[0, 0], grad_out[0, 0], weight, normalized_shape=(4,), **kwargs)
    with pytest.raises(ValueError, match="grad_out"):
        norm_layer_backward(x, grad_out[:1], weight, normalized_shape=(4,), **kwargs)
    with pytest.raises(ValueError, match="weight"):
        norm_layer_backward(x, grad_out, randn(5), normalized_shape=(4,), **kwargs)
    with pytest.raises(ValueError, match="has_bias"):
        norm_layer_backward(x, grad_out, None, normalized_shape=(4,), eps=1e-5, rms=False,
                            has_bias=True)
    with pytest.raises(ValueError, match="eps"):
        norm_layer_backward(x, grad_out, weight, normalized_shape=(4,), eps=-1.0, rms=False,
                            has_bias=False)
