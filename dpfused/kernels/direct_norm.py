"""Direct per-example squared norms of linear-type weight gradients.

    ‖G_i‖²_F = Σ_{p<m, q<n} (Σ_t left[i,t,p] · right[i,t,q])²

Kernel: one program per (example i, BLOCK_M × BLOCK_N tile of G_i). It builds its tile of G_i on
chip as a small GEMM over T (left tileᵀ · right tile, reduced in BLOCK_T chunks, fp32
accumulator), squares and sums it, and writes one partial sum. G_i itself never reaches memory;
the launcher adds the (B, tiles) partials.

Cost per example ~2·T·m·n FLOPs: the cheaper form when T·(m+n) ≥ m·n (long sequences, narrow
layers); see dispatch.choose_norm_path and ghost_norm.py for the other form.
"""

import torch

from ._checks import (accum_dtype, check_dim, check_same_device, check_tensor, common_dtype,
                      dot_precision, next_pow2)
from ._compat import INTERPRETING_AT_IMPORT, tl, triton
from .dispatch import resolve_impl

# ---------------------------------------------------------------------------------------------
# Autotune configs: (BLOCK_M, BLOCK_N, BLOCK_T, num_warps, num_stages), keyed on m, n and the
# padded T. The interpreter gets one small config.
# ---------------------------------------------------------------------------------------------
_GPU_CONFIGS = [
    (64, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (128, 64, 32, 4, 4),
    (128, 128, 32, 8, 3),
    (128, 256, 32, 8, 3),
]
_INTERPRETER_CONFIGS = [(16, 16, 16, 1, 1)]
_CONFIGS = _INTERPRETER_CONFIGS if INTERPRETING_AT_IMPORT else _GPU_CONFIGS
_MIN_BLOCK_M = min(c[0] for c in _CONFIGS)  # smallest tiles size the partial-sum buffer
_MIN_BLOCK_N = min(c[1] for c in _CONFIGS)
_MAX_GRID_B = 65535  # CUDA limit of grid axis 1, which indexes examples


def _autotune_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_T": bt}, num_warps=w, num_stages=s)
            for bm, bn, bt, w, s in _CONFIGS]


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def _direct_kernel(
    left_ptr, right_ptr, out_ptr,
    T, M, N,
    stride_lb, stride_lt, stride_lm,
    stride_rb, stride_rt, stride_rn,
    stride_outb,
    T_BUCKET,  # autotune key only
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # cast dot operands to fp32 (the interpreter mis-handles bf16 dots)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_tile = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid_tile // num_n
    pid_n = pid_tile % num_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    mask_m = offs_m < M
    mask_n = offs_n < N
    left_base = left_ptr + pid_b * stride_lb
    right_base = right_ptr + pid_b * stride_rb

    # ---- phase 1: the (BLOCK_M, BLOCK_N) tile of G_i = Σ_t left_t ⊗ right_t, reduced over T ----
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    l_ptrs = left_base + offs_m[:, None] * stride_lm + offs_t[None, :] * stride_lt  # (M, T)
    r_ptrs = right_base + offs_t[:, None] * stride_rt + offs_n[None, :] * stride_rn  # (T, N)
    for t_start in range(0, T, BLOCK_T):
        mask_t = offs_t < T - t_start
        a = tl.load(l_ptrs, mask=mask_m[:, None] & mask_t[None, :], other=0.0)
        b = tl.load(r_ptrs, mask=mask_t[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        l_ptrs += BLOCK_T * stride_lt
        r_ptrs += BLOCK_T * stride_rt

    # ---- phase 2: square and sum the tile (masked rows/cols are exact zeros) -------------------
    tl.store(out_ptr + pid_b * stride_outb + pid_tile, tl.sum(acc * acc))


_direct_kernel_tuned = triton.autotune(configs=_autotune_configs(),
                                       key=["T_BUCKET", "M", "N"])(_direct_kernel)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
def _launch(left, right, *, config: dict | None = None) -> torch.Tensor:
    """Run the kernel; `config` (BLOCK_M/BLOCK_N/BLOCK_T) bypasses autotuning (tests)."""
    B, T, M = left.shape
    N = right.shape[2]
    if B > _MAX_GRID_B:
        raise ValueError(f"batch size {B} exceeds {_MAX_GRID_B}; split the batch")
    dtype = common_dtype(left, right)
    left, right = left.to(dtype), right.to(dtype)

    min_m = config["BLOCK_M"] if config else _MIN_BLOCK_M
    min_n = config["BLOCK_N"] if config else _MIN_BLOCK_N
    n_partials = max(1, triton.cdiv(M, min_m) * triton.cdiv(N, min_n))
    partial = torch.zeros((B, n_partials), dtype=torch.float32, device=left.device)
    if B > 0 and T > 0 and M > 0 and N > 0:
        kernel = _direct_kernel if config else _direct_kernel_tuned
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), B)
        kernel[grid](
            left, right, partial,
            T, M, N,
            left.stride(0), left.stride(1), left.stride(2),
            right.stride(0), right.stride(1), right.stride(2),
            partial.stride(0),
            next_pow2(T),
            DOT_PRECISION=dot_precision(dtype), UPCAST=INTERPRETING_AT_IMPORT,
            **(config or {}),
        )
    return partial.sum(1)


# ---------------------------------------------------------------------------------------------
# Torch reference twin: materialize G_i (a few examples at a time, to bound memory)
# ---------------------------------------------------------------------------------------------
_TORCH_CHUNK_ELEMENTS = 1 << 26  # at most ~64M entries of G held at once


def direct_norm_sq_torch(left, right) -> torch.Tensor:
    """‖Σ_t left_t ⊗ right_t‖²_F per example, by building G_i with einsum."""
    acc = accum_dtype(left, right)
    B, _, M = left.shape
    N = right.shape[2]
    chunk = max(1, _TORCH_CHUNK_ELEMENTS // max(1, M * N))
    out = torch.empty(B, dtype=acc, device=left.device)
    for start in range(0, B, chunk):
        sl = slice(start, start + chunk)
        grads = torch.einsum("btm,btn->bmn", left[sl].to(acc), right[sl].to(acc))  # (b, m, n)
        out[sl] = grads.pow(2).sum(dim=(1, 2))
    return out


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def direct_norm_sq(left: torch.Tensor, right: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Per-example ‖Σ_t left_t ⊗ right_t‖²_F, building G_i tile by tile on chip.

    Args:
        left: (B, T, m), e.g. the output gradient of an nn.Linear.
        right: (B, T, n), e.g. its input activations.
        impl: "auto" (Triton on CUDA, else torch), "triton" or "torch".

    Returns:
        (B,) float32 (float64 when an input is float64).

    Raises:
        ValueError: bad shapes, dims, devices or dtypes; see dispatch.resolve_impl for `impl`.
    """
    check_tensor("left", left, ndim=3)
    check_tensor("right", right, ndim=3)
    check_same_device(left=left, right=right)
    check_dim("right.shape[0]", right.shape[0], "left.shape[0]", left.shape[0])
    check_dim("right.shape[1]", right.shape[1], "left.shape[1]", left.shape[1])
    if resolve_impl(impl, left, right) == "torch":
        return direct_norm_sq_torch(left, right)
    return _launch(left, right)


__all__ = ["direct_norm_sq", "direct_norm_sq_torch"]
