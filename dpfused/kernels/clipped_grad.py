"""Clipped (per-example scaled) weight gradient of a linear-type layer, reduced example by example.

    S = Σ_i scale[i] · G_i,    G_i = Σ_t left[i,t] ⊗ right[i,t]                        (m × n)

With scale[i] = the clip factor c_i this is the only weight gradient a per-layer-clipped layer ever
computes (docs/design.md §4).

Floating point: each example first, then the examples together (docs/design.md §3). The one GEMM
over all B·T rows, Lᵀ·diag(scale ⊗ 1_T)·R, costs the same FLOPs but lets one example's rounding
reach the others: an example whose tokens carry +M·u⊗v and −M·u⊗v has G_i = 0 and a clip factor of
1, yet in the shared accumulator +M absorbs every row added before it and −M leaves nothing of them
(the other examples' whole contribution erased). Here example i's rows are reduced over t into a
tile of its own (fp32, on chip), and only then scaled and added to the output tile, in float64. What
one example can change is then its own reduced G̃_i (‖G̃_i − G_i‖ ≤ γ_T K_i, K_i = Σ_t ‖left_t‖
‖right_t‖, which the clip factor's norm bound covers), and the float64 sum over examples of terms of
norm at most C each rounds by a relative 2^-53 per addition.

Scaling without overflow: the left rows of example i are multiplied on load by p_i, the power of two
just below scale[i] (exact in every binary float format), and the reduced tile by scale[i] / p_i in
[1, 2) in float64. A crafted example with entries near the dtype's range has a tiny clip factor, so
its scaled rows stay in range where its unscaled reduction would overflow.

Kernel: one program per (BLOCK_M × BLOCK_N output tile, range of examples); per example a GEMM over
its T rows in BLOCK_K chunks (tensor cores for bf16/fp16, exact fp32 dots for fp32), then the
float64 multiply-add into the output tile. Ranges of examples (SPLIT_B > 1) keep the GPU busy when
m·n is small and B large; their float64 tiles are added with float64 atomics. The float64 epilogue
costs m·n operations per example next to the 2·T·m·n of the GEMM.
"""

import torch

from ._checks import (accum_dtype, check_dim, check_same_device, check_scale, check_tensor,
                      common_dtype, dot_precision, exact_fp32_matmul, next_pow2)
from ._compat import INTERPRETING_AT_IMPORT, tl, triton
from .dispatch import resolve_impl

# ---------------------------------------------------------------------------------------------
# Autotune configs: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT_B, num_warps, num_stages), keyed on
# m, n, the padded T and the padded B. The interpreter gets one small config. The float64 output
# tile takes twice the registers of an fp32 one: tiles stay at 64×64 with 8 warps (64×128 and
# 128×64, or 4 warps, spill on unaligned sizes).
# ---------------------------------------------------------------------------------------------
# tests/kernels/test_kernels_sm90_compile.py compiles all of them for sm_90 with ptxas. fp32 is
# pruned at launch (`_prune_configs`).
_GPU_CONFIGS = [
    (64, 64, 32, 8, 1, 8, 3),
    (64, 64, 64, 8, 1, 8, 3),
    (64, 64, 32, 8, 4, 8, 3),
    (64, 64, 32, 8, 16, 8, 3),
]
_INTERPRETER_CONFIGS = [(16, 16, 16, 4, 1, 1, 1)]
_CONFIGS = _INTERPRETER_CONFIGS if INTERPRETING_AT_IMPORT else _GPU_CONFIGS

# Exact fp32 dots (DOT_PRECISION="ieee") run on CUDA cores and hold the accumulator tiles in
# registers; with the float64 tile beside the fp32 one, above 32 fp32 accumulators per thread ptxas
# spills.
_MAX_FMA_ACC_PER_THREAD = 32


def _autotune_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g,
                           "SPLIT_B": sb}, num_warps=w, num_stages=s)
            for bm, bn, bk, g, sb, w, s in _CONFIGS]


def _prune_configs(configs, named_args, **kwargs):
    """Drop the tiles too big for CUDA-core fp32 dots (keeps at least one config): the fp32
    operand tiles sit in registers next to the two accumulators, so BLOCK_K stays at 32."""
    if kwargs.get("DOT_PRECISION") != "ieee":
        return configs
    fits = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]
            <= _MAX_FMA_ACC_PER_THREAD * 32 * c.num_warps and c.kwargs["BLOCK_K"] <= 32]
    return fits or configs


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------
# One kernel is one fused launch, so its phases stay in one body (longer than ~60 lines), each
# under a banner comment.
@triton.jit
def _clipped_grad_kernel(
    left_ptr, right_ptr, pow2_ptr, rest_ptr, out_ptr,
    B, T, M, N,
    stride_lb, stride_lt, stride_lm,
    stride_rb, stride_rt, stride_rn,
    stride_om, stride_on,
    T_BUCKET, B_BUCKET,  # autotune keys only
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # keep dot operands in fp32 (the interpreter mis-handles bf16 dots)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_B: tl.constexpr,
):
    # ---- phase 0: which output tile and which examples (grouped order for L2 reuse) ----------
    pid = tl.program_id(0)
    pid_b = tl.program_id(1)
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
    per_split = tl.cdiv(B, SPLIT_B)
    b_begin = pid_b * per_split
    b_end = tl.minimum(B, b_begin + per_split)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    example = b_begin.to(tl.int64)  # 64-bit offsets: B·T·width may pass 2**31
    for _ in range(b_begin, b_end):
        pow2 = tl.load(pow2_ptr + example)
        l_ptrs = (left_ptr + example * stride_lb + offs_m[:, None] * stride_lm
                  + offs_k[None, :] * stride_lt)  # (M, K)
        r_ptrs = (right_ptr + example * stride_rb + offs_k[:, None] * stride_rt
                  + offs_n[None, :] * stride_rn)  # (K, N)

        # ---- phase 1: this example's tile of p_i·G_i, a GEMM over its own T rows ------------
        tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t_start in range(0, T, BLOCK_K):
            mask_t = offs_k < T - t_start
            a = tl.load(l_ptrs, mask=mask_m[:, None] & mask_t[None, :], other=0.0)
            r = tl.load(r_ptrs, mask=mask_t[:, None] & mask_n[None, :], other=0.0)
            a_scaled = a.to(tl.float32) * pow2  # a power of two: exact
            if UPCAST:
                r = r.to(tl.float32)
            else:
                a_scaled = a_scaled.to(a.dtype)  # back to the input dtype for tensor-core dots
            tile = tl.dot(a_scaled, r, tile, input_precision=DOT_PRECISION)
            l_ptrs += BLOCK_K * stride_lt
            r_ptrs += BLOCK_K * stride_rt

        # ---- phase 2: scale the reduced tile and add it in float64 -------------------------------
        rest = tl.load(rest_ptr + example)
        acc += tile.to(tl.float64) * rest
        example += 1

    # ---- phase 3: write the tile (ranges of examples are added atomically) ---------------------
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_B == 1:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


_clipped_grad_kernel_tuned = triton.autotune(
    configs=_autotune_configs(), key=["M", "N", "T_BUCKET", "B_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_configs},
    reset_to_zero=["out_ptr"],  # ranges of examples accumulate into the output
)(_clipped_grad_kernel)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
def split_scale(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, scale / p): p the power of two at or below each scale (0 -> p = 0.5, rest 0), in float64.

    Multiplying by p is exact in every binary format (module docstring); scale / p lies in [1, 2).
    """
    mantissa, exponent = torch.frexp(scale.double())  # scale = mantissa · 2^exponent, |m| in [.5, 1)
    pow2 = torch.ldexp(torch.ones_like(mantissa), exponent - 1)
    return pow2, scale.double() / pow2


def _launch(left, right, scale, *, config: dict | None = None) -> torch.Tensor:
    """Run the kernel; `config` (all five block/group/split sizes) bypasses autotuning."""
    B, T, M = left.shape
    N = right.shape[2]
    dtype = common_dtype(left, right)
    left, right = left.to(dtype), right.to(dtype)
    pow2, rest = split_scale(scale)
    # p below fp32's range underflows to 0: the example's rows vanish, which only lowers its share.
    pow2 = pow2.to(torch.float32).contiguous()
    rest = rest.contiguous()
    out = torch.zeros((M, N), dtype=torch.float64, device=left.device)
    if B > 0 and T > 0 and M > 0 and N > 0:
        kernel = _clipped_grad_kernel if config else _clipped_grad_kernel_tuned
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_B"])
        kernel[grid](
            left, right, pow2, rest, out,
            B, T, M, N,
            left.stride(0), left.stride(1), left.stride(2),
            right.stride(0), right.stride(1), right.stride(2),
            out.stride(0), out.stride(1),
            next_pow2(T), next_pow2(B),
            DOT_PRECISION=dot_precision(dtype), UPCAST=INTERPRETING_AT_IMPORT,
            **(config or {}),
        )
    return out.to(torch.float32)


def _check_inputs(left, right, scale):
    check_tensor("left", left, ndim=3)
    check_tensor("right", right, ndim=3)
    check_same_device(left=left, right=right)
    check_dim("right.shape[0]", right.shape[0], "left.shape[0]", left.shape[0])
    check_dim("right.shape[1]", right.shape[1], "left.shape[1]", left.shape[1])
    check_scale(scale, left.shape[0], left.device)


# ---------------------------------------------------------------------------------------------
# Torch reference twin (the same order: each example reduced, then float64 across examples)
# ---------------------------------------------------------------------------------------------
_TORCH_CHUNK_ELEMENTS = 1 << 24  # at most ~16M entries of per-example gradients held at once


def add_examples_float64(out: torch.Tensor, per_example: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor:
    """``out += sum_i weights[i] * per_example[i]`` into a float64 ``out``, one example at a time:
    each product and sum rounded in float64 (the examples' float64 sum of the module docstring),
    without a float64 copy of ``per_example`` (the copy and a gemv cost twice the time on the CPU)."""
    for grad, weight in zip(per_example, weights.double().tolist()):
        out.add_(grad.reshape(out.shape), alpha=weight)
    return out


def clipped_weight_grad_torch(left, right, scale) -> torch.Tensor:
    """Σ_i scale[i] G_i: G_i reduced per example in fp32 (float64 for float64 inputs), from rows
    pre-scaled by p_i; the examples added in float64."""
    acc = accum_dtype(left, right)
    B, T, M = left.shape
    N = right.shape[2]
    pow2, rest = split_scale(scale)
    out = torch.zeros((M, N), dtype=torch.float64, device=left.device)
    chunk = max(1, _TORCH_CHUNK_ELEMENTS // max(1, M * N))
    with exact_fp32_matmul():
        for start in range(0, B, chunk):
            sl = slice(start, start + chunk)
            scaled = left[sl].to(acc) * pow2[sl].to(acc).view(-1, 1, 1)
            grads = torch.bmm(scaled.transpose(1, 2), right[sl].to(acc))  # (b, m, n)
            add_examples_float64(out, grads, rest[sl])
    return out.to(acc)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def clipped_weight_grad(left: torch.Tensor, right: torch.Tensor, scale: torch.Tensor, *,
                        impl: str = "auto") -> torch.Tensor:
    """Σ_i scale[i] · Σ_t left[i,t] ⊗ right[i,t], the per-example-scaled weight gradient.

    Args:
        left: (B, T, m), e.g. an nn.Linear's output gradient (m = d_out).
        right: (B, T, n), its input activations (n = d_in).
        scale: (B,) per-example factors (clip factors), float32 or float64.
        impl: "auto" (the Triton kernel on CUDA, elsewhere the torch twin), "triton" or "torch".

    Returns:
        (m, n) float32 (float64 for float64 inputs).

    Raises:
        ValueError: bad shapes, dims, devices or dtypes; see dispatch.resolve_impl for `impl`.
    """
    _check_inputs(left, right, scale)
    if resolve_impl(impl, left, right) == "torch":
        return clipped_weight_grad_torch(left, right, scale)
    return _launch(left, right, scale)


__all__ = ["clipped_weight_grad", "clipped_weight_grad_torch", "split_scale"]
