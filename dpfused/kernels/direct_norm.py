"""Direct per-example squared norms of linear-type weight gradients.

    ‖G_i‖²_F = Σ_{p<m, q<n} (Σ_t left[i,t,p] · right[i,t,q])²

Kernel: one program per (example i, BLOCK_M × BLOCK_N tile of G_i). It builds its tile of G_i on
chip as a small GEMM over T (left tileᵀ · right tile, reduced in BLOCK_T chunks, fp32
accumulator), squares and sums it, and writes one partial sum. G_i itself never reaches memory;
the launcher adds the (B, tiles) partials.

Cost per example ~2·T·m·n FLOPs: the cheaper form when T·(m+n) ≥ m·n (long sequences, narrow
layers); see dispatch.choose_norm_path and ghost_norm.py for the other form.

Floating point (docs/design.md §3). The computed G̃_i differs from G_i entry by entry by at most
γ_T Σ_t |left_t[p]||right_t[q]| (a T-term sum in fp32, any order), so ‖G̃_i − G_i‖ ≤ γ_T K_i with
K_i = Σ_t ‖left_t‖‖right_t‖; squaring and summing positive terms adds a relative γ of its own. A
middle token u ⊗ v lost between +M·a ⊗ b and −M·a ⊗ b is within that bound, so `direct_norm_sq_bounded`
reports ‖G̃_i‖² with error 2γ_T K_i ‖G̃_i‖ + (γ_T K_i)² + γ_sq ‖G̃_i‖²: never below the truth once
the error is added. The squares overflow fp32 for entries beyond ~1.8e19: the value is then inf and
the caller falls back to K_i.
"""

import torch

from ._checks import (Estimate, FactorNorms, accum_dtype, check_dim, check_same_device,
                      check_tensor, common_dtype, dot_precision, exact_fp32_matmul, factor_norms,
                      gamma, next_pow2)
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
# The most terms one square passes through before the float64 partial sums: a row, then a column.
_MAX_SQUARE_SUM = max(c[0] + c[1] for c in _GPU_CONFIGS + _INTERPRETER_CONFIGS) + 1
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
    # Rows, then columns: each level sums at most BLOCK_N, then BLOCK_M terms (the error bound).
    tl.store(out_ptr + pid_b * stride_outb + pid_tile, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


def _prune_configs(configs, named_args, **kwargs):
    """Exact fp32 dots (DOT_PRECISION="ieee") hold the tile in registers on CUDA cores: keep
    tiles of at most 64 fp32 accumulators per thread (the 128×256 tile spills kilobytes)."""
    if kwargs.get("DOT_PRECISION") != "ieee":
        return configs
    fits = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps]
    return fits or configs


_direct_kernel_tuned = triton.autotune(configs=_autotune_configs(), key=["T_BUCKET", "M", "N"],
                                       prune_configs_by={"early_config_prune": _prune_configs},
                                       )(_direct_kernel)


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
    return partial.double().sum(1)


def _bounded(value, left, norms: FactorNorms, *, dtype, squares: float) -> Estimate:
    """The module docstring's bound: G̃ off by γ_T K in Frobenius norm, its squares summed with a
    relative error ``squares``."""
    drift = gamma(left.shape[1], dtype) * norms.magnitude
    error = 2 * drift * value.clamp_min(0).sqrt() + drift * drift + squares * value.abs()
    return Estimate(value, error)


# ---------------------------------------------------------------------------------------------
# Torch reference twin: materialize G_i (a few examples at a time, to bound memory)
# ---------------------------------------------------------------------------------------------
_TORCH_CHUNK_ELEMENTS = 1 << 26  # at most ~64M entries of G held at once


def direct_norm_sq_torch(left, right, norms: FactorNorms | None = None) -> Estimate:
    """‖Σ_t left_t ⊗ right_t‖²_F per example, by building G_i with einsum (in the accumulation
    dtype) and summing its squares in float64; with the module docstring's error bound."""
    acc = accum_dtype(left, right)
    B, _, M = left.shape
    N = right.shape[2]
    chunk = max(1, _TORCH_CHUNK_ELEMENTS // max(1, M * N))
    out = torch.empty(B, dtype=torch.float64, device=left.device)
    with exact_fp32_matmul():
        for start in range(0, B, chunk):
            sl = slice(start, start + chunk)
            grads = torch.einsum("btm,btn->bmn", left[sl].to(acc), right[sl].to(acc))  # (b, m, n)
            out[sl] = grads.double().pow(2).sum(dim=(1, 2))
    norms = norms if norms is not None else factor_norms(left, right)
    return _bounded(out, left, norms, dtype=acc, squares=gamma(M * N + 1, torch.float64))


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def direct_norm_sq_bounded(left: torch.Tensor, right: torch.Tensor, *, impl: str = "auto",
                           norms: FactorNorms | None = None) -> Estimate:
    """Per-example ‖Σ_t left_t ⊗ right_t‖²_F, building G_i tile by tile on chip, with an error bound.

    Args:
        left: (B, T, m), e.g. the output gradient of an nn.Linear.
        right: (B, T, n), e.g. its input activations.
        impl: "auto" (Triton on CUDA, else torch), "triton" or "torch".
        norms: ``factor_norms(left, right)`` when the caller has them already.

    Returns:
        ``Estimate(value, error)``, both (B,) float64: |value − ‖G_i‖²| <= error for any input
        (inf where the squares overflowed).

    Raises:
        ValueError: bad shapes, dims, devices or dtypes; see dispatch.resolve_impl for `impl`.
    """
    check_tensor("left", left, ndim=3)
    check_tensor("right", right, ndim=3)
    check_same_device(left=left, right=right)
    check_dim("right.shape[0]", right.shape[0], "left.shape[0]", left.shape[0])
    check_dim("right.shape[1]", right.shape[1], "left.shape[1]", left.shape[1])
    if resolve_impl(impl, left, right) == "torch":
        return direct_norm_sq_torch(left, right, norms)
    norms = norms if norms is not None else factor_norms(left, right)
    return _bounded(_launch(left, right), left, norms, dtype=torch.float32,
                    squares=gamma(_MAX_SQUARE_SUM, torch.float32))


def direct_norm_sq(left: torch.Tensor, right: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """The value of ``direct_norm_sq_bounded``: (B,) float32 (float64 when an input is float64)."""
    return direct_norm_sq_bounded(left, right, impl=impl).value.to(accum_dtype(left, right))


__all__ = ["direct_norm_sq", "direct_norm_sq_bounded", "direct_norm_sq_torch"]
