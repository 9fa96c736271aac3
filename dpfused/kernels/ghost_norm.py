"""Ghost per-example squared norms of linear-type weight gradients, with rigorous error bounds.

A linear-type layer's per-example weight gradient is G_i = Σ_t left[i,t] ⊗ right[i,t] (m × n);
for nn.Linear left = output grad g (m = d_out) and right = input a (n = d_in). Its squared
Frobenius norm needs no G_i (Goodfellow's "ghost" trick):

    ‖G_i‖² = Σ_{t,s} (left_t·left_s)(right_t·right_s) = ⟨L Lᵀ, R Rᵀ⟩_F          (T×T Gram matrices)

and the cross term of two uses of one weight (tied weights, docs/design.md §3) is

    ⟨G^(1), G^(2)⟩ = Σ_{t,s} (left1_t·left2_s)(right1_t·right2_s)          (t < T1, s < T2).

Floating point. The sum can cancel catastrophically: an example whose tokens are x and −(1−δ)x has a
tiny ‖G_i‖ made of huge terms, and its computed value can be anywhere in ±(rounding of the terms),
negative or zero included. A clip factor from such a value lets the example escape clipping, so every
op here also returns `error`, a bound on |computed − exact| that holds for any input
(docs/design.md §3, "Floating point"):

    |value − exact| ≤ (1+γ_Σ)·(γ_m E_L + γ_n E_R + γ_Σ A) + γ_m γ_n K1 K2,
    E_L = Σ_{t,s} ‖l1_t‖‖l2_s‖ |RR̃_ts|,  E_R = Σ_{t,s} ‖r1_t‖‖r2_s‖ |LL̃_ts|,  A = Σ_{t,s} |LL̃_ts RR̃_ts|,

with LL̃, RR̃ the computed Gram entries (each off by at most γ_m ‖l1_t‖‖l2_s‖, resp. γ_n ‖r1_t‖‖r2_s‖),
K_u = Σ_t ‖l_u,t‖‖r_u,t‖ and γ_Σ the bound of the final summation. E_L and E_R weight each Gram
error by the other Gram's entry, so for ordinary data (tokens far from parallel) the bound is about
(γ_m + γ_n)·‖G_i‖², not the (γ_m + γ_n)·K² a cruder analysis gives.

Kernel: like flash attention, each program owns one block of BLOCK_T rows t of one example and walks
the blocks of s; per (t, s) tile it builds both Gram tiles on chip (reducing over m, then n, in
BLOCK_K chunks), multiplies them elementwise and adds to fp32 accumulators (the value, E_L, E_R and
A). No B×T×T tensor ever reaches memory. For the norm (one operand set) the Gram product is
symmetric, so a program only walks s-blocks at or after its own and counts off-diagonal tiles twice:
half the FLOPs. Each program writes one partial sum per accumulator; the launcher adds the
(B, T/BLOCK_T) partials in float64.

Cost per example ~2·T²·(m+n) FLOPs (half that with symmetry) versus ~2·T·m·n for the direct form
(direct_norm.py); dispatch.choose_norm_path picks. The error terms add a few elementwise operations
per Gram entry, next to the 2(m+n) of the Grams themselves.
"""

import torch

from ._checks import (Estimate, FactorNorms, accum_dtype, check_dim, check_same_device,
                      check_tensor, common_dtype, dot_precision, exact_fp32_matmul, factor_norms,
                      gamma, next_pow2)
from ._compat import INTERPRETING_AT_IMPORT, tl, triton
from .dispatch import resolve_impl

# ---------------------------------------------------------------------------------------------
# Autotune configs: (BLOCK_T, BLOCK_K, num_warps, num_stages), keyed on the padded sequence length
# and the two widths. The interpreter gets one small config (autotuning there would only burn time).
# ---------------------------------------------------------------------------------------------
# Registers and spills for sm_90 are checked in CI (tests/kernels/test_kernels_sm90_compile.py).
# BLOCK_T = 128 (16 warps) spills once the error accumulators sit beside the value's: not offered.
_GPU_CONFIGS = [
    (32, 32, 4, 4),
    (32, 64, 4, 4),
    (64, 32, 8, 3),
    (64, 64, 8, 3),
]
_INTERPRETER_CONFIGS = [(16, 16, 1, 1)]
_CONFIGS = _INTERPRETER_CONFIGS if INTERPRETING_AT_IMPORT else _GPU_CONFIGS
# Smallest BLOCK_T of any config: sizes the buffer of per-program partial sums.
_MIN_BLOCK_T = min(c[0] for c in _CONFIGS)
_MAX_BLOCK_T = max(c[0] for c in _GPU_CONFIGS + _INTERPRETER_CONFIGS)
_MAX_GRID_B = 65535  # CUDA limit of grid axis 1, which indexes examples
_ACCUMULATORS = 4  # value, E_L, E_R, A (module docstring)


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
    l1_ptr, r1_ptr, l2_ptr, r2_ptr, nl1_ptr, nr1_ptr, nl2_ptr, nr2_ptr, out_ptr,
    T1, T2, M, N,
    stride_l1b, stride_l1t, stride_l1m,
    stride_r1b, stride_r1t, stride_r1n,
    stride_l2b, stride_l2t, stride_l2m,
    stride_r2b, stride_r2t, stride_r2n,
    stride_n1b, stride_n2b,  # row-norm vectors (B, T1) and (B, T2), contiguous in t
    stride_outa, stride_outb,  # out: (accumulator, B, partials)
    T_BUCKET,  # autotune key only (next power of two of max(T1, T2))
    SYMMETRIC: tl.constexpr,  # operand sets 1 and 2 are the same tensors
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
    nl_t = tl.load(nl1_ptr + pid_b * stride_n1b + offs_t, mask=mask_t, other=0.0)
    nr_t = tl.load(nr1_ptr + pid_b * stride_n1b + offs_t, mask=mask_t, other=0.0)

    # Row sums of the accumulated tiles: (BLOCK_T,) vectors keep register pressure low.
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    acc_el = tl.zeros((BLOCK_T,), dtype=tl.float32)
    acc_er = tl.zeros((BLOCK_T,), dtype=tl.float32)
    acc_abs = tl.zeros((BLOCK_T,), dtype=tl.float32)

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

        # ---- phase 3: the value and its error terms (module docstring) ----------------------
        # Symmetric walk: an off-diagonal tile also stands for its transpose, so it counts twice.
        nl_s = tl.load(nl2_ptr + pid_b * stride_n2b + offs_s, mask=mask_s, other=0.0)
        nr_s = tl.load(nr2_ptr + pid_b * stride_n2b + offs_s, mask=mask_s, other=0.0)
        if SYMMETRIC:
            weight = 1.0 + (s_start > t_start).to(tl.float32)
        else:
            weight = 1.0
        product = ll * rr
        acc += tl.sum(product, axis=1) * weight
        acc_abs += tl.sum(tl.abs(product), axis=1) * weight
        acc_el += tl.sum(nl_t[:, None] * nl_s[None, :] * tl.abs(rr), axis=1) * weight
        acc_er += tl.sum(nr_t[:, None] * nr_s[None, :] * tl.abs(ll), axis=1) * weight

    # ---- epilogue: one partial sum per (accumulator, example, t-block) -----------------------
    out = out_ptr + pid_b * stride_outb + pid_t
    tl.store(out, tl.sum(acc))
    tl.store(out + stride_outa, tl.sum(acc_el))
    tl.store(out + 2 * stride_outa, tl.sum(acc_er))
    tl.store(out + 3 * stride_outa, tl.sum(acc_abs))


def _prune_configs(configs, named_args, **kwargs):
    """Exact fp32 dots (DOT_PRECISION="ieee") keep their operand tiles in registers: BLOCK_K = 64
    spills there, so fp32 runs the BLOCK_K = 32 configs (keeps at least one)."""
    if kwargs.get("DOT_PRECISION") != "ieee":
        return configs
    return [c for c in configs if c.kwargs["BLOCK_K"] <= 32] or configs


_ghost_kernel_tuned = triton.autotune(configs=_autotune_configs(),
                                      key=["T_BUCKET", "M", "N", "SYMMETRIC"],
                                      prune_configs_by={"early_config_prune": _prune_configs},
                                      )(_ghost_kernel)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
def _launch(l1, r1, l2, r2, norms1: FactorNorms, norms2: FactorNorms, *, symmetric: bool,
            config: dict | None = None):
    """Run the kernel; returns the float64 sums (value, E_L, E_R, A), each (B,).

    `config` (e.g. {"BLOCK_T": 16, "BLOCK_K": 16}) bypasses autotuning; tests use it.
    """
    B, T1, M = l1.shape
    T2, N = l2.shape[1], r1.shape[2]
    device = l1.device
    if B > _MAX_GRID_B:
        raise ValueError(f"batch size {B} exceeds {_MAX_GRID_B}; split the batch")
    dtype = common_dtype(l1, r1, l2, r2)
    l1, r1, l2, r2 = (t.to(dtype) for t in (l1, r1, l2, r2))
    # Row norms in fp32 (an overflow to inf makes the error inf: the caller then falls back).
    nl1, nr1, nl2, nr2 = (n.float().contiguous() for n in (*norms1, *norms2))

    min_block = config["BLOCK_T"] if config else _MIN_BLOCK_T
    n_partials = max(1, triton.cdiv(T1, min_block))
    partial = torch.zeros((_ACCUMULATORS, B, n_partials), dtype=torch.float32, device=device)
    if B > 0 and T1 > 0 and T2 > 0:
        kernel = _ghost_kernel if config else _ghost_kernel_tuned
        grid = lambda meta: (triton.cdiv(T1, meta["BLOCK_T"]), B)  # noqa: E731
        kernel[grid](
            l1, r1, l2, r2, nl1, nr1, nl2, nr2, partial,
            T1, T2, M, N,
            l1.stride(0), l1.stride(1), l1.stride(2),
            r1.stride(0), r1.stride(1), r1.stride(2),
            l2.stride(0), l2.stride(1), l2.stride(2),
            r2.stride(0), r2.stride(1), r2.stride(2),
            nl1.stride(0), nl2.stride(0),
            partial.stride(0), partial.stride(1),
            next_pow2(max(T1, T2)),
            SYMMETRIC=symmetric,
            DOT_PRECISION=dot_precision(dtype), UPCAST=INTERPRETING_AT_IMPORT,
            **(config or {}),
        )
    return partial.double().sum(dim=2).unbind(0)


def _triton_estimate(l1, r1, l2, r2, *, symmetric: bool, norms1: FactorNorms | None = None,
                     norms2: FactorNorms | None = None, config: dict | None = None) -> Estimate:
    norms1 = norms1 if norms1 is not None else factor_norms(l1, r1)
    norms2 = norms1 if symmetric else (norms2 if norms2 is not None else factor_norms(l2, r2))
    value, e_left, e_right, absolute = _launch(l1, r1, l2, r2, norms1, norms2,
                                               symmetric=symmetric, config=config)
    # Every product passes through: a row sum of a tile (<= BLOCK_T terms), the walk over s-blocks
    # (<= T2/BLOCK_T + 1), the tile sum (BLOCK_T), the partials (<= T1/BLOCK_T + 1), the weight and
    # the product itself: counted generously, in fp32.
    summed = 2 * _MAX_BLOCK_T + l1.shape[1] + l2.shape[1] + 4
    return _estimate(value, e_left, e_right, absolute, l1, r1, norms1, norms2,
                     gram_dtype=torch.float32, summation=gamma(summed, torch.float32))


def _estimate(value, e_left, e_right, absolute, l1, r1, norms1, norms2, *,
              gram_dtype: torch.dtype, summation: float) -> Estimate:
    """The bound of the module docstring from the four float64 sums; ``gram_dtype`` is the Gram
    matrices' accumulation dtype, ``summation`` the γ of the sums over (t, s)."""
    g_m, g_n = gamma(l1.shape[2], gram_dtype), gamma(r1.shape[2], gram_dtype)
    error = ((1 + summation) * (g_m * e_left + g_n * e_right + summation * absolute)
             + g_m * g_n * norms1.magnitude * norms2.magnitude)
    return Estimate(value, error)


def magnitude(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """K_i = Σ_t ‖left_{i,t}‖·‖right_{i,t}‖ in float64, (B,): an upper bound of ‖G_i‖ (triangle
    inequality), finite for every finite fp32/bf16/fp16 input."""
    return factor_norms(left, right).magnitude


def _check_operands(left_name, left, right_name, right):
    check_tensor(left_name, left, ndim=3)
    check_tensor(right_name, right, ndim=3)
    check_same_device(**{left_name: left, right_name: right})
    check_dim(f"{right_name}.shape[0]", right.shape[0], f"{left_name}.shape[0]", left.shape[0])
    check_dim(f"{right_name}.shape[1]", right.shape[1], f"{left_name}.shape[1]", left.shape[1])


# ---------------------------------------------------------------------------------------------
# Torch reference twins (materialize the B×T×T Gram matrices; the product and its sums in float64)
# ---------------------------------------------------------------------------------------------
def ghost_inner_torch(left1, right1, left2, right2, norms1: FactorNorms | None = None,
                      norms2: FactorNorms | None = None) -> Estimate:
    """Σ_{t,s} (left1_t·left2_s)(right1_t·right2_s) per example, via explicit Gram matrices in the
    accumulation dtype, products and sums in float64, with the error bound of the module docstring."""
    acc = accum_dtype(left1, right1, left2, right2)
    with exact_fp32_matmul():
        gram_l = torch.einsum("btm,bsm->bts", left1.to(acc), left2.to(acc)).double()  # (B,T1,T2)
        gram_r = torch.einsum("btn,bsn->bts", right1.to(acc), right2.to(acc)).double()
    product = gram_l * gram_r

    def outer(a, b):  # (B, T1), (B, T2) -> (B, T1, T2)
        return a[:, :, None] * b[:, None, :]

    norms1 = norms1 if norms1 is not None else factor_norms(left1, right1)
    norms2 = norms2 if norms2 is not None else factor_norms(left2, right2)
    e_left = (outer(norms1.left, norms2.left) * gram_r.abs()).sum(dim=(1, 2))
    e_right = (outer(norms1.right, norms2.right) * gram_l.abs()).sum(dim=(1, 2))
    summation = gamma(left1.shape[1] * left2.shape[1] + 2, torch.float64)
    return _estimate(product.sum(dim=(1, 2)), e_left, e_right, product.abs().sum(dim=(1, 2)),
                     left1, right1, norms1, norms2, gram_dtype=acc, summation=summation)


def ghost_norm_sq_torch(left, right, norms: FactorNorms | None = None) -> Estimate:
    """Σ_{t,s} (left_t·left_s)(right_t·right_s) per example, with its error bound."""
    norms = norms if norms is not None else factor_norms(left, right)
    return ghost_inner_torch(left, right, left, right, norms, norms)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def ghost_norm_sq_bounded(left: torch.Tensor, right: torch.Tensor, *, impl: str = "auto",
                          norms: FactorNorms | None = None) -> Estimate:
    """Per-example ‖Σ_t left_t ⊗ right_t‖²_F by the ghost form, and a bound on its error.

    Args:
        left: (B, T, m), e.g. the output gradient of an nn.Linear.
        right: (B, T, n), e.g. the input activations of that nn.Linear.
        impl: "auto" (Triton on CUDA, else torch), "triton" or "torch".
        norms: ``factor_norms(left, right)`` when the caller has them already.

    Returns:
        ``Estimate(value, error)``, both (B,) float64: |value − ‖G_i‖²| <= error for any input
        (inf, or a NaN value, where the computation overflowed: callers fall back to the magnitude).

    Raises:
        ValueError: bad shapes, dims, devices or dtypes; see dispatch.resolve_impl for `impl`.
    """
    _check_operands("left", left, "right", right)
    if resolve_impl(impl, left, right) == "torch":
        return ghost_norm_sq_torch(left, right, norms)
    return _triton_estimate(left, right, left, right, symmetric=True, norms1=norms)


def ghost_norm_sq(left: torch.Tensor, right: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """The value of ``ghost_norm_sq_bounded``: (B,) float32 (float64 when an input is float64)."""
    return _as_output(ghost_norm_sq_bounded(left, right, impl=impl).value, left, right)


def ghost_inner_bounded(left1: torch.Tensor, right1: torch.Tensor, left2: torch.Tensor,
                        right2: torch.Tensor, *, impl: str = "auto",
                        norms1: FactorNorms | None = None,
                        norms2: FactorNorms | None = None) -> Estimate:
    """Per-example ⟨G^(1), G^(2)⟩_F of two linear-type uses of one weight (tied weights), with a
    bound on its error.

    G^(u) = Σ_t left_u[t] ⊗ right_u[t]; the sequence lengths T1 and T2 may differ.

    Args:
        left1: (B, T1, m); right1: (B, T1, n); left2: (B, T2, m); right2: (B, T2, n).
        impl: "auto", "triton" or "torch".
        norms1, norms2: the two pairs' ``factor_norms``, when the caller has them already.

    Returns:
        ``Estimate(value, error)``, both (B,) float64.

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
        return ghost_inner_torch(left1, right1, left2, right2, norms1, norms2)
    return _triton_estimate(left1, right1, left2, right2, symmetric=False, norms1=norms1,
                            norms2=norms2)


def ghost_inner(left1: torch.Tensor, right1: torch.Tensor, left2: torch.Tensor,
                right2: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """The value of ``ghost_inner_bounded``: (B,) float32 (float64 for float64 inputs)."""
    value = ghost_inner_bounded(left1, right1, left2, right2, impl=impl).value
    return _as_output(value, left1, right1, left2, right2)


def _as_output(value: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    return value.to(accum_dtype(*inputs))


__all__ = ["ghost_inner", "ghost_inner_bounded", "ghost_inner_torch", "ghost_norm_sq",
           "ghost_norm_sq_bounded", "ghost_norm_sq_torch", "magnitude"]
