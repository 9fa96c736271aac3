"""Clipped (per-example scaled) weight gradient of a linear-type layer.

    S = Σ_{i,t} scale[i] · left[i,t] ⊗ right[i,t] = Lᵀ · diag(scale ⊗ 1_T) · R        (m × n)

with L = left viewed as (B·T, m) and R = right as (B·T, n). With scale[i] = the clip factor c_i
this is the only weight gradient a per-layer-clipped layer ever computes (docs/design.md §4).

Two ways to compute it:
- fused (the Triton kernel below): a GEMM over the B·T rows whose left-operand loads are
  multiplied by scale[row // T] on chip. One pass over L and R, no scaled copy in memory. Split-K
  (SPLIT_K row ranges added with fp32 atomics) keeps the GPU busy when m·n is small and B·T large.
- scale_matmul (`clipped_weight_grad_scale_matmul`): scale `left` (in place when allowed), then
  one cuBLAS GEMM. cuBLAS is usually faster than a Triton GEMM, but the scaling is an extra
  read+write of B·T·m elements and, out of place, a B·T·m copy in memory.

Why `impl="auto"` picks per shape (`choose_clipped_grad_variant`): the extra pass moves ~4·B·T·m
bytes (bf16) against 2·B·T·m·n FLOPs of GEMM, so its share of the time falls like 1/n. On an H100
(~3.35 TB/s, ~990 dense bf16 TFLOP/s) it is ~14% of the GEMM at n = 4096 and ~4% at n = 14336:
narrow right operands favour the fused kernel, wide ones favour cuBLAS. The crossover
(`_SCALE_MATMUL_MIN_COLS`) is an estimate from that arithmetic, NOT a measurement: run
benchmarks/bench_kernels.py on the target GPU and move it. The fused kernel is also the one that adds
no memory, which per-layer clipping relies on.
"""

from typing import Literal

import torch

from ._checks import (accum_dtype, check_dim, check_same_device, check_scale, check_tensor,
                      common_dtype, dot_precision, next_pow2)
from ._compat import INTERPRETING_AT_IMPORT, tl, triton
from .dispatch import resolve_impl

# ---------------------------------------------------------------------------------------------
# Autotune configs: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT_K, num_warps, num_stages), keyed on
# m, n and the padded row count B·T. The interpreter gets one small config.
# ---------------------------------------------------------------------------------------------
# tests/kernels/test_kernels_sm90_compile.py compiles all of them for sm_90 with ptxas: in bf16
# none spills. fp32 is pruned at launch (`_prune_configs`).
_GPU_CONFIGS = [
    (128, 128, 32, 8, 1, 8, 4),
    (64, 128, 32, 8, 1, 4, 4),
    (128, 256, 64, 8, 1, 8, 3),
    (128, 128, 32, 8, 4, 8, 4),
    (128, 64, 32, 8, 8, 4, 4),
    (64, 64, 32, 8, 16, 4, 4),
]
_INTERPRETER_CONFIGS = [(16, 16, 16, 4, 1, 1, 1)]
_CONFIGS = _INTERPRETER_CONFIGS if INTERPRETING_AT_IMPORT else _GPU_CONFIGS

# Use scale-then-cuBLAS when n (right's width) reaches this (an estimate; see the docstring).
_SCALE_MATMUL_MIN_COLS = 8192
# Exact fp32 dots (DOT_PRECISION="ieee") run on CUDA cores, not tensor cores, and hold the whole
# accumulator tile in registers: above 64 fp32 accumulators per thread ptxas spills (5.6 KB per
# thread for the 128×256 tile on sm_90, whose fp32 operand buffers also take 225 of 227 KiB of
# shared memory).
_MAX_FMA_ACC_PER_THREAD = 64


def _autotune_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g,
                           "SPLIT_K": sk}, num_warps=w, num_stages=s)
            for bm, bn, bk, g, sk, w, s in _CONFIGS]


def _prune_configs(configs, named_args, **kwargs):
    """Drop the tiles too big for CUDA-core fp32 dots (keeps at least one config)."""
    if kwargs.get("DOT_PRECISION") != "ieee":
        return configs
    fits = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]
            <= _MAX_FMA_ACC_PER_THREAD * 32 * c.num_warps]
    return fits or configs


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------
# One kernel is one fused launch, so its phases stay in one body (longer than ~60 lines), each
# under a banner comment.
@triton.jit
def _clipped_grad_kernel(
    left_ptr, right_ptr, scale_ptr, out_ptr,
    T, M, N, ROWS,  # ROWS = B·T, the reduction length
    stride_lr, stride_lm,  # left viewed as (B·T, m)
    stride_rr, stride_rn,  # right viewed as (B·T, n)
    stride_s, stride_om, stride_on,
    ROWS_BUCKET,  # autotune key only
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # keep dot operands in fp32 (the interpreter mis-handles bf16 dots)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    # ---- phase 0: which output tile and which row range (grouped order for L2 reuse) ---------
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_n
    first_m = (pid // num_in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_size
    pid_n = (pid % num_in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if SPLIT_K == 1:
        row_begin = 0  # a constant start lets the compiler keep far fewer registers live
        row_end = ROWS
    else:
        rows_per_split = tl.cdiv(tl.cdiv(ROWS, SPLIT_K), BLOCK_K) * BLOCK_K
        row_begin = pid_k * rows_per_split
        row_end = tl.minimum(ROWS, row_begin + rows_per_split)
    rows = row_begin + offs_k
    first_rows = rows.to(tl.int64)  # 64-bit: B·T·width may pass 2**31
    l_ptrs = left_ptr + offs_m[:, None] * stride_lm + first_rows[None, :] * stride_lr  # (M, K)
    r_ptrs = right_ptr + first_rows[:, None] * stride_rr + offs_n[None, :] * stride_rn  # (K, N)

    # ---- phase 1: GEMM over rows; scale[row // T] fused into the left-operand load ------------
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(row_begin, row_end, BLOCK_K):
        mask_r = rows < row_end
        s = tl.load(scale_ptr + (rows // T) * stride_s, mask=mask_r, other=0.0).to(tl.float32)
        a = tl.load(l_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        b = tl.load(r_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        a_scaled = a.to(tl.float32) * s[None, :]
        if UPCAST:
            b = b.to(tl.float32)
        else:
            a_scaled = a_scaled.to(a.dtype)  # back to the input dtype for tensor-core dots
        acc = tl.dot(a_scaled, b, acc, input_precision=DOT_PRECISION)
        rows += BLOCK_K
        l_ptrs += BLOCK_K * stride_lr
        r_ptrs += BLOCK_K * stride_rr

    # ---- phase 2: write the tile (split-K partial tiles are added atomically) -----------------
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


_clipped_grad_kernel_tuned = triton.autotune(
    configs=_autotune_configs(), key=["M", "N", "ROWS_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_configs},
    reset_to_zero=["out_ptr"],  # split-K configs accumulate into the output
)(_clipped_grad_kernel)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
def _launch(left, right, scale, *, config: dict | None = None) -> torch.Tensor:
    """Run the fused kernel; `config` (all five block/group/split sizes) bypasses autotuning."""
    B, T, M = left.shape
    N = right.shape[2]
    dtype = common_dtype(left, right)
    rows = B * T
    # Flat (B·T, width) views: free for the usual layouts; other layouts are copied once.
    left, right = left.to(dtype).reshape(rows, M), right.to(dtype).reshape(rows, N)
    scale = scale.to(torch.float32)
    out = torch.zeros((M, N), dtype=torch.float32, device=left.device)
    if rows > 0 and M > 0 and N > 0:
        kernel = _clipped_grad_kernel if config else _clipped_grad_kernel_tuned
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])
        kernel[grid](
            left, right, scale, out,
            T, M, N, rows,
            left.stride(0), left.stride(1),
            right.stride(0), right.stride(1),
            scale.stride(0), out.stride(0), out.stride(1),
            next_pow2(rows),
            DOT_PRECISION=dot_precision(dtype), UPCAST=INTERPRETING_AT_IMPORT,
            **(config or {}),
        )
    return out


def _check_inputs(left, right, scale):
    check_tensor("left", left, ndim=3)
    check_tensor("right", right, ndim=3)
    check_same_device(left=left, right=right)
    check_dim("right.shape[0]", right.shape[0], "left.shape[0]", left.shape[0])
    check_dim("right.shape[1]", right.shape[1], "left.shape[1]", left.shape[1])
    check_scale(scale, left.shape[0], left.device)


# ---------------------------------------------------------------------------------------------
# The comparison variant: scale, then one library GEMM
# ---------------------------------------------------------------------------------------------
def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b returned in fp32; half-precision CUDA GEMMs write fp32 directly when torch can."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # older torch: no out_dtype
            pass
    return torch.mm(a, b).to(torch.float32 if a.dtype != torch.float64 else torch.float64)


def clipped_weight_grad_scale_matmul(left: torch.Tensor, right: torch.Tensor, scale: torch.Tensor,
                                     *, inplace: bool = False) -> torch.Tensor:
    """Σ_{i,t} scale[i]·left[i,t] ⊗ right[i,t] by scaling `left` then one torch.mm (cuBLAS).

    Args:
        left: (B, T, m). With `inplace=True` it is overwritten by scale[i]·left[i]; only pass a
            tensor nothing else reads afterwards (e.g. an output gradient already used for
            grad_input).
        right: (B, T, n).
        scale: (B,) per-example factors.
        inplace: scale `left` in place instead of allocating a scaled copy.

    Returns:
        (m, n) float32 (float64 for float64 inputs). The GEMM runs in the input dtype.

    Raises:
        ValueError: bad shapes, dims, devices or dtypes.
    """
    _check_inputs(left, right, scale)
    B, T, M = left.shape
    N = right.shape[2]
    dtype = common_dtype(left, right)
    if inplace and left.dtype != dtype:
        raise ValueError(f"inplace=True needs left.dtype ({left.dtype}) to match right.dtype "
                         f"({right.dtype})")
    factors = scale.to(dtype).view(B, 1, 1)
    scaled = left.mul_(factors) if inplace else left.to(dtype) * factors
    return _mm_fp32_out(scaled.reshape(B * T, M).t(), right.to(dtype).reshape(B * T, N))


def choose_clipped_grad_variant(*, rows: int, cols: int) -> Literal["fused", "scale_matmul"]:
    """Fused Triton GEMM or scale-then-cuBLAS for an (rows × cols) = (m × n) weight gradient.

    The scaling pass costs ~1/cols of the GEMM (module docstring), so wide right operands go to
    cuBLAS. `rows` is accepted for a future measured table; the estimate does not use it.
    """
    return "scale_matmul" if cols >= _SCALE_MATMUL_MIN_COLS else "fused"


# ---------------------------------------------------------------------------------------------
# Torch reference twin (exact: fp32 or float64 math throughout)
# ---------------------------------------------------------------------------------------------
def clipped_weight_grad_torch(left, right, scale) -> torch.Tensor:
    """Lᵀ · diag(scale) · R over the B·T rows, computed in fp32 (float64 for float64 inputs)."""
    acc = accum_dtype(left, right)
    B, T, M = left.shape
    N = right.shape[2]
    scaled = left.to(acc) * scale.to(acc).view(B, 1, 1)
    return scaled.reshape(B * T, M).t() @ right.to(acc).reshape(B * T, N)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def clipped_weight_grad(left: torch.Tensor, right: torch.Tensor, scale: torch.Tensor, *,
                        impl: str = "auto") -> torch.Tensor:
    """Σ_{i,t} scale[i] · left[i,t] ⊗ right[i,t], the per-example-scaled weight gradient.

    Args:
        left: (B, T, m), e.g. an nn.Linear's output gradient (m = d_out).
        right: (B, T, n), its input activations (n = d_in).
        scale: (B,) float32 per-example factors (clip factors).
        impl: "auto" (on CUDA: fused Triton GEMM or scale-then-cuBLAS, chosen per shape by
            `choose_clipped_grad_variant`; elsewhere the torch twin), "triton" (always the fused
            kernel) or "torch" (the fp32 reference twin).

    Returns:
        (m, n) float32 (float64 for float64 inputs).

    Raises:
        ValueError: bad shapes, dims, devices or dtypes; see dispatch.resolve_impl for `impl`.
    """
    _check_inputs(left, right, scale)
    path = resolve_impl(impl, left, right, scale)
    if path == "torch":
        return clipped_weight_grad_torch(left, right, scale)
    if impl == "auto" and choose_clipped_grad_variant(
            rows=left.shape[2], cols=right.shape[2]) == "scale_matmul":
        return clipped_weight_grad_scale_matmul(left, right, scale)
    return _launch(left, right, scale)


__all__ = ["choose_clipped_grad_variant", "clipped_weight_grad",
           "clipped_weight_grad_scale_matmul", "clipped_weight_grad_torch"]
