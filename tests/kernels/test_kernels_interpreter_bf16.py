"""bf16 inputs through the CPU interpreter (one small case per op).

The interpreter computes tl.dot on bf16 operands from their raw bits (wrong values), so the kernels
upcast dot operands to fp32 when interpreting (`UPCAST`). These checks cover that path and the bf16
loads/stores around it; the real bf16 dots are checked on CUDA by the bf16 cases in the op tests.
"""

import pytest
import torch
from kernel_oracles import CUDA, embedding_grads, frob_err, per_example_grads, rel_err

import dpfused.kernels as k

pytestmark = pytest.mark.skipif(CUDA, reason="CUDA runs the real bf16 cases")
BF16 = torch.bfloat16


def test_linear_ops_bf16_interpreted():
    left, right = torch.randn(2, 17, 9).to(BF16), torch.randn(2, 17, 20).to(BF16)
    grads = per_example_grads(left, right)
    norms = grads.pow(2).sum(dim=(1, 2))
    assert rel_err(k.ghost_norm_sq(left, right, impl="triton"), norms) <= 1e-5
    assert rel_err(k.direct_norm_sq(left, right, impl="triton"), norms) <= 1e-5
    scale = torch.rand(2)
    out = k.clipped_weight_grad(left, right, scale, impl="triton")
    assert frob_err(out, torch.einsum("b,bmn->mn", scale.double(), grads)) <= 1e-2


def test_embedding_and_norm_layer_bf16_interpreted():
    ids, grad = torch.randint(0, 4, (2, 17)), torch.randn(2, 17, 5).to(BF16)
    expected = embedding_grads(ids, grad, 4, 1).pow(2).sum(dim=(1, 2))
    assert rel_err(k.embedding_norm_sq(ids, grad, padding_idx=1), expected) <= 1e-5  # grouped form
    x, g, w = torch.randn(2, 5, 7).to(BF16), torch.randn(2, 5, 7).to(BF16), torch.randn(7)
    kwargs = dict(normalized_shape=(7,), eps=1e-5, rms=False, has_bias=True)
    got = k.norm_layer_backward(x, g, w, impl="triton", **kwargs)
    ref = k.norm_layer_backward(x.double(), g.double(), w.double(), impl="torch", **kwargs)
    assert got[0].dtype == BF16
    assert frob_err(got[0], ref[0]) <= 1e-2  # grad_input is rounded to bf16
    assert frob_err(got[1], ref[1]) <= 1e-5 and frob_err(got[2], ref[2]) <= 1e-5
