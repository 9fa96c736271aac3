"""Per-layer clipped backward of a Linear costs (almost) no memory beyond the plain backward."""

import pytest
import torch

from dpfused.kernels import choose_norm_path, clipped_weight_grad, direct_norm_sq, ghost_norm_sq


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_clipped_backward_peak_memory_within_5_percent_of_plain():
    B, T, d_in, d_out = 32, 512, 1024, 4096
    dtype, dev = torch.bfloat16, "cuda"
    weight = torch.randn(d_out, d_in, device=dev, dtype=dtype)
    a = torch.randn(B, T, d_in, device=dev, dtype=dtype)  # saved input
    g = torch.randn(B, T, d_out, device=dev, dtype=dtype)  # output gradient

    def plain():
        grad_input = g @ weight  # (B, T, d_in)
        grad_weight = g.reshape(-1, d_out).t() @ a.reshape(-1, d_in)  # (d_out, d_in)
        return grad_input, grad_weight

    def clipped():
        grad_input = g @ weight
        path = choose_norm_path(seq_len=T, rows=d_out, cols=d_in)
        norms = (ghost_norm_sq if path == "ghost" else direct_norm_sq)(g, a)  # (B,)
        scale = (1.0 / (norms.sqrt() + 1e-6)).clamp(max=1.0)
        return grad_input, clipped_weight_grad(g, a, scale)

    def peak_bytes(fn):
        fn()  # warm up: autotuning, cuBLAS workspace
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated()

    plain_peak = peak_bytes(plain)
    clipped_peak = peak_bytes(clipped)
    # Peaks include the live inputs (a, g, weight), as in a real backward.
    assert clipped_peak < 1.05 * plain_peak, (clipped_peak, plain_peak)
