"""Ghost per-example squared norms of linear-type weight gradients.

A linear-type layer's per-example weight gradient is G_i = Σ_t left[i,t] ⊗ right[i,t] (m × n);
for nn.Linear left = output grad g (m = d_out) and right = input a (n = d_in). Its squared
Frobenius norm needs no G_i (Goodfellow's "ghost" trick):

    ‖G_i‖² = Σ_{t,s} (left_t·left_s)(right_t·right_s) = ⟨L Lᵀ, R Rᵀ⟩_F          (T×T Gram matrices)

and the cross term of two uses of one weight (tied weights, docs/design.md §3) is

    ⟨G^(1), G^(2)⟩ = Σ_{t,s} (left1_t·left2_s)(right1_t·right2_s)          (t < T1, s < T2).

The bias of the same layer has ‖Σ_t left_t‖² = Σ_{t,s} left_t·left_s: the sum of the left Gram
matrix, which the kernel has in hand anyway (`ghost_norm_sq_with_bias`).

Kernel: like flash attention, each program owns one block of BLOCK_T rows t of one example and walks
the blocks of s; per (t, s) tile it builds both Gram tiles on chip (reducing over m, then n, in
BLOCK_K chunks), multiplies them elementwise and adds to an fp32 accumulator. No B×T×T tensor ever
reaches memory. For the norm (one operand set) the Gram product is symmetric, so a program only
walks s-blocks at or after its own and counts off-diagonal tiles twice: half the FLOPs. Each
program writes one partial sum; the launcher adds the (B, T/BLOCK_T) partials.

Cost per example ~2·T²·(m+n) FLOPs (half that with symmetry) versus ~2·T·m·n for the direct form
(direct_norm.py); dispatch.choose_norm_path picks.
"""

import torch

from ._checks import (accum_dtype, check_dim, check_same_device, check_tensor, common_dtype,
                      dot_precision, next_pow2)
from ._compat import INTERPRETING_AT_IMPORT, tl, triton
from .dispatch import resolve_impl

# ---------------------------------------------------------------------------------------------
# Autotune configs: (BLOCK_T, BLOCK_K, num_warps, num_stages), keyed on the padded sequence length
# and the two widths. The interpreter gets one small config (autotuning there would only burn time).
# ---------------------------------------------------------------------------------------------
# Registers and spills for sm_90 are checked in CI (tests/kernels/test_kernels_sm90_compile.py):
# bf16 spills at most 8 B (32/32 at 4 warps), fp32 284 B at BLOCK_T=128 (16 warps cap registers
# at 128 and two 128x128 fp32 accumulators do not fit).
_GPU_CONFIGS = [
    (32, 32, 4, 4),
    (32, 64, 4, 4),
    (64, 32, 8, 3),
    (64, 64, 8, 3),
    (128, 32, 16, 2),
]
_INTERPRETER_CONFIGS = [(16, 16, 1, 1)]
_CONFIGS = _INTERPRETER_CONFIGS if INTERPRETING_AT_IMPORT else _GPU_CONFIGS
# Smallest BLOCK_T of any config: sizes the buffer of per-program partial sums.
_MIN_BLOCK_T = min(c[0] for c in _CONFIGS)
_MAX_GRID_B = 65535  # CUDA limit of grid axis 1, which indexes examples


def _autotune_configs():
    return [triton.Config({"BLOCK_T": bt, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bt, bk, w, s in _CONFIGS]


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------
# One kernel is one fused launch, so its phases stay in one body (longer than ~60 lines), each
# under a banner comment.
@triton.jit
def _ghost_kernel(
    l1_ptr, r1_ptr, l2_ptr, r2_ptr, out_ptr, bias_out_ptr,
    T1, T2, M, N,
    stride_l1b, stride_l1t, stride_l1m,
    stride_r1b, stride_r1t, stride_r1n,
    stride_l2b, stride_l2t, stride_l2m,
    stride_r2b, stride_r2t, stride_r2n,
    stride_outb,
    T_BUCKET,  # autotune key only (next power of two of max(T1, T2))
    SYMMETRIC: tl.constexpr,  # operand sets 1 and 2 are the same tensors
    WITH_BIAS: tl.constexpr,  # also sum the left Gram matrix (bias norm)
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # cast dot operands to fp32 (the interpreter mis-handles bf16 dots)
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)  # 64-bit example offsets: B·T·m may pass 2**31

    t_start = pid_t * BLOCK_T
    offs_t = t_start + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    mask_t = offs_t < T1
    l1_base = l1_ptr + pid_b * stride_l1b
    r1_base = r1_ptr + pid_b * stride_r1b
    l2_base = l2_ptr + pid_b * stride_l2b
    r2_base = r2_ptr + pid_b * stride_r2b

    # Row sums of the accumulated tiles: a (BLOCK_T,) vector keeps register pressure low.
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    acc_bias = tl.zeros((BLOCK_T,), dtype=tl.float32)

    # With one operand set the (t, s) Gram product is symmetric: walk only s-blocks >= this t-block.
    if SYMMETRIC:
        s_begin = t_start
    else:
        s_begin = 0
    for s_start in range(s_begin, T2, BLOCK_T):
        offs_s = s_start + tl.arange(0, BLOCK_T)
        mask_s = offs_s < T2

        # ---- phase 1: left Gram tile LL[t, s] = left1_t · left2_s, reduced over m ----------
        ll = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
        l1_ptrs = l1_base + offs_t[:, None] * stride_l1t + offs_k[None, :] * stride_l1m  # (T, K)
        l2_ptrs = l2_base + offs_k[:, None] * stride_l2m + offs_s[None, :] * stride_l2t  # (K, S)
        for k_start in range(0, M, BLOCK_K):
            mask_k = offs_k < M - k_start
            a = tl.load(l1_ptrs, mask=mask_t[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(l2_ptrs, mask=mask_k[:, None] & mask_s[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            ll = tl.dot(a, b, ll, input_precision=DOT_PRECISION)
            l1_ptrs += BLOCK_K * stride_l1m
            l2_ptrs += BLOCK_K * stride_l2m

        # ---- phase 2: right Gram tile RR[t, s] = right1_t · right2_s, reduced over n --------
        rr = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
        r1_ptrs = r1_base + offs_t[:, None] * stride_r1t + offs_k[None, :] * stride_r1n  # (T, K)
        r2_ptrs = r2_base + offs_k[:, None] * stride_r2n + offs_s[None, :] * stride_r2t  # (K, S)
        for k_start in range(0, N, BLOCK_K):
            mask_k = offs_k < N - k_start
            a = tl.load(r1_ptrs, mask=mask_t[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(r2_ptrs, mask=mask_k[:, None] & mask_s[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            rr = tl.dot(a, b, rr, input_precision=DOT_PRECISION)
            r1_ptrs += BLOCK_K * stride_r1n
            r2_ptrs += BLOCK_K * stride_r2n

        # ---- phase 3: accumulate the elementwise product -----------------------------------
        # Symmetric walk: an off-diagonal tile also stands for its transpose, so it counts twice.
        if SYMMETRIC:
            weight = 1.0 + (s_start > t_start).to(tl.float32)
            ll = ll * weight
        acc += tl.sum(ll * rr, axis=1)
        if WITH_BIAS:
            acc_bias += tl.sum(ll, axis=1)

    # ---- epilogue: one partial sum per (example, t-block) ---------------------------------
    tl.store(out_ptr + pid_b * stride_outb + pid_t, tl.sum(acc))
    if WITH_BIAS:
        tl.store(bias_out_ptr + pid_b * stride_outb + pid_t, tl.sum(acc_bias))


_ghost_kernel_tuned = triton.autotune(configs=_autotune_configs(),
                                      key=["T_BUCKET", "M", "N", "SYMMETRIC"])(_ghost_kernel)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
def _launch(l1, r1, l2, r2, *, symmetric: bool, with_bias: bool, config: dict | None = None):
    """Run the kernel; returns (weight norm² or inner product (B,), bias norm² (B,) or None).

    `config` (e.g. {"BLOCK_T": 16, "BLOCK_K": 16}) bypasses autotuning; tests use it.
    """
    B, T1, M = l1.shape
    T2, N = l2.shape[1], r1.shape[2]
    device = l1.device
    if B > _MAX_GRID_B:
        raise ValueError(f"batch size {B} exceeds {_MAX_GRID_B}; split the batch")
    dtype = common_dtype(l1, r1, l2, r2)
    l1, r1, l2, r2 = (t.to(dtype) for t in (l1, r1, l2, r2))

    min_block = config["BLOCK_T"] if config else _MIN_BLOCK_T
    n_partials = max(1, triton.cdiv(T1, min_block))
    partial = torch.zeros((B, n_partials), dtype=torch.float32, device=device)
    bias_partial = torch.zeros_like(partial) if with_bias else partial
    if B > 0 and T1 > 0 and T2 > 0:
        kernel = _ghost_kernel if config else _ghost_kernel_tuned
        grid = lambda meta: (triton.cdiv(T1, meta["BLOCK_T"]), B)  # noqa: E731
        kernel[grid](
            l1, r1, l2, r2, partial, bias_partial,
            T1, T2, M, N,
            l1.stride(0), l1.stride(1), l1.stride(2),
            r1.stride(0), r1.stride(1), r1.stride(2),
            l2.stride(0), l2.stride(1), l2.stride(2),
            r2.stride(0), r2.stride(1), r2.stride(2),
            partial.stride(0),
            next_pow2(max(T1, T2)),
            SYMMETRIC=symmetric, WITH_BIAS=with_bias,
            DOT_PRECISION=dot_precision(dtype), UPCAST=INTERPRETING_AT_IMPORT,
            **(config or {}),
        )
    return partial.sum(1), (bias_partial.sum(1) if with_bias else None)


def _check_operands(left_name, left, right_name, right):
    check_tensor(left_name, left, ndim=3)
    check_tensor(right_name, right, ndim=3)
    check_same_device(**{left_name: left, right_name: right})
    check_dim(f"{right_name}.shape[0]", right.shape[0], f"{left_name}.shape[0]", left.shape[0])
    check_dim(f"{right_name}.shape[1]", right.shape[1], f"{left_name}.shape[1]", left.shape[1])


# ---------------------------------------------------------------------------------------------
# Torch reference twins (materialize the B×T×T Gram matrices; accumulate in fp32 or float64)
# ---------------------------------------------------------------------------------------------
def ghost_inner_torch(left1, right1, left2, right2) -> torch.Tensor:
    """Σ_{t,s} (left1_t·left2_s)(right1_t·right2_s) per example, via explicit Gram matrices."""
    acc = accum_dtype(left1, right1, left2, right2)
    gram_l = torch.einsum("btm,bsm->bts", left1.to(acc), left2.to(acc))  # (B, T1, T2)
    gram_r = torch.einsum("btn,bsn->bts", right1.to(acc), right2.to(acc))  # (B, T1, T2)
    return (gram_l * gram_r).sum(dim=(1, 2))


def ghost_norm_sq_torch(left, right) -> torch.Tensor:
    """Σ_{t,s} (left_t·left_s)(right_t·right_s) per example."""
    return ghost_inner_torch(left, right, left, right)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def ghost_norm_sq(left: torch.Tensor, right: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Per-example ‖Σ_t left_t ⊗ right_t‖²_F by the ghost form, without materializing G_i.

    Args:
        left: (B, T, m), e.g. the output gradient of an nn.Linear.
        right: (B, T, n), e.g. the input activations of that nn.Linear.
        impl: "auto" (Triton on CUDA, else torch), "triton" or "torch".

    Returns:
        (B,) float32 (float64 when an input is float64).

    Raises:
        ValueError: bad shapes, dims, devices or dtypes; see dispatch.resolve_impl for `impl`.
    """
    _check_operands("left", left, "right", right)
    if resolve_impl(impl, left, right) == "torch":
        return ghost_norm_sq_torch(left, right)
    return _launch(left, right, left, right, symmetric=True, with_bias=False)[0]


def ghost_norm_sq_with_bias(left: torch.Tensor, right: torch.Tensor, *,
                            impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Ghost weight norm² and the bias norm² ‖Σ_t left_t‖² of the same layer, in one pass.

    Args:
        left: (B, T, m) output gradient.
        right: (B, T, n) input activations.
        impl: "auto", "triton" or "torch".

    Returns:
        (weight norm² (B,), bias norm² (B,)), float32 (float64 for float64 inputs).

    Raises:
        ValueError: bad shapes, dims, devices or dtypes, or `impl`.
    """
    _check_operands("left", left, "right", right)
    if resolve_impl(impl, left, right) == "torch":
        acc = accum_dtype(left, right)
        bias = left.to(acc).sum(dim=1).pow(2).sum(dim=1)
        return ghost_norm_sq_torch(left, right), bias
    weight, bias = _launch(left, right, left, right, symmetric=True, with_bias=True)
    return weight, bias


def ghost_inner(left1: torch.Tensor, right1: torch.Tensor, left2: torch.Tensor,
                right2: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Per-example ⟨G^(1), G^(2)⟩_F of two linear-type uses of one weight (tied weights).

    G^(u) = Σ_t left_u[t] ⊗ right_u[t]; the sequence lengths T1 and T2 may differ.

    Args:
        left1: (B, T1, m); right1: (B, T1, n); left2: (B, T2, m); right2: (B, T2, n).
        impl: "auto", "triton" or "torch".

    Returns:
        (B,) float32 (float64 for float64 inputs).

    Raises:
        ValueError: bad shapes, dims, devices or dtypes, or `impl`.
    """
    _check_operands("left1", left1, "right1", right1)
    _check_operands("left2", left2, "right2", right2)
    check_same_device(left1=left1, left2=left2)
    check_dim("left2.shape[0]", left2.shape[0], "left1.shape[0]", left1.shape[0])
    check_dim("left2.shape[2]", left2.shape[2], "left1.shape[2]", left1.shape[2])
    check_dim("right2.shape[2]", right2.shape[2], "right1.shape[2]", right1.shape[2])
    if resolve_impl(impl, left1, right1, left2, right2) == "torch":
        return ghost_inner_torch(left1, right1, left2, right2)
    return _launch(left1, right1, left2, right2, symmetric=False, with_bias=False)[0]


__all__ = ["ghost_inner", "ghost_inner_torch", "ghost_norm_sq", "ghost_norm_sq_torch",
           "ghost_norm_sq_with_bias"]
