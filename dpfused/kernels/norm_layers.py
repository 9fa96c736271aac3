"""LayerNorm / RMSNorm backward with per-example parameter gradients, in one pass.

For x of shape (B, *, *normalized_shape), flattened to (B, R, N) with N = prod(normalized_shape):

    LayerNorm (rms=False): x̂ = (x − mean(x)) · rstd,  rstd = 1/sqrt(var(x) + eps)  (biased var)
    RMSNorm   (rms=True):  x̂ = x · rstd,              rstd = 1/sqrt(mean(x²) + eps)
    y = x̂ ⊙ w (+ b)

Given g = ∂L/∂y and dx̂ = g ⊙ w (g without affine weight), per row:

    LayerNorm: ∂L/∂x = rstd · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ ⊙ x̂))
    RMSNorm:   ∂L/∂x = rstd · (dx̂ − x̂ · mean(dx̂ ⊙ x̂))

and per example i the parameter gradients are small vectors, materialized (docs/design.md §3):

    ∂L_i/∂w = Σ_r x̂_{i,r} ⊙ g_{i,r},      ∂L_i/∂b = Σ_r g_{i,r}.

Kernel: each program takes one example's chunk of rows, BLOCK_R rows × the whole normalized width
at a time; it recomputes the statistics, writes grad_input and keeps fp32 running sums of x̂ ⊙ g and
g in registers, so x and g are read once for all three outputs. Each program writes its partial sums
to a (B, chunks, N) buffer that the launcher adds up.
"""

import math

import torch

from ._checks import accum_dtype, check_same_device, next_pow2
from ._compat import INTERPRETING_AT_IMPORT, tl, triton
from .dispatch import resolve_impl

# ---------------------------------------------------------------------------------------------
# Autotune configs: num_warps, keyed on the tile shape. Tile sizes come from the launcher: the
# whole normalized width (BLOCK_N) times as many rows as fit ~4K elements (BLOCK_R).
# ---------------------------------------------------------------------------------------------
_GPU_WARPS = [2, 4, 8, 16, 32]
_INTERPRETER_WARPS = [1]
_WARPS = _INTERPRETER_WARPS if INTERPRETING_AT_IMPORT else _GPU_WARPS
_TILE_ELEMENTS = 4096  # BLOCK_R · BLOCK_N target
_TARGET_PROGRAMS = 8 if INTERPRETING_AT_IMPORT else 1024  # row chunks across the batch
_MAX_TRITON_N = 16384  # wider rows spill out of registers; "auto" falls back to torch
_MAX_GRID_B = 65535  # CUDA limit of grid axis 1, which indexes examples
# At most this many elements of a (BLOCK_R, BLOCK_N) tile per thread, so that x, g, x̂, dx and the
# running sums stay in registers. ptxas for sm_90 (tests/kernels/sm90_compile.py) spills nothing or
# a few dozen bytes at 32 elements per thread, up to ~1 KB at 64, 6-25 KB at 128-256.
_MAX_ELEMENTS_PER_THREAD = 32


def _autotune_configs():
    return [triton.Config({}, num_warps=w) for w in _WARPS]


def _prune_configs(configs, named_args, **kwargs):
    """The warp counts that spread the tile thinly enough (else the most warps declared)."""
    tile = kwargs["BLOCK_R"] * kwargs["BLOCK_N"]
    fits = [c for c in configs if tile <= _MAX_ELEMENTS_PER_THREAD * 32 * c.num_warps]
    return fits or [max(configs, key=lambda c: c.num_warps)]


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------
# One kernel is one fused launch, so its phases stay in one body (longer than ~60 lines), each
# under a banner comment.
@triton.jit
def _norm_backward_kernel(
    x_ptr, g_ptr, w_ptr, dx_ptr, dw_ptr, db_ptr,
    R, N, ROWS_PER_PROG, eps,
    stride_xb, stride_xr,
    stride_gb, stride_gr,
    stride_dxb, stride_dxr,
    stride_pb, stride_pc,  # partial-sum buffers (B, chunks, N), last dim contiguous
    RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x_base = x_ptr + pid_b * stride_xb
    g_base = g_ptr + pid_b * stride_gb
    dx_base = dx_ptr + pid_b * stride_dxb
    if HAS_WEIGHT:
        w = tl.load(w_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)

    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_begin = pid_c * ROWS_PER_PROG
    row_end = tl.minimum(R, row_begin + ROWS_PER_PROG)
    for r_start in range(row_begin, row_end, BLOCK_R):
        offs_r = r_start + tl.arange(0, BLOCK_R)
        mask_r = offs_r < row_end
        mask = mask_r[:, None] & mask_n[None, :]
        x = tl.load(x_base + offs_r[:, None] * stride_xr + offs_n[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        g = tl.load(g_base + offs_r[:, None] * stride_gr + offs_n[None, :], mask=mask,
                    other=0.0).to(tl.float32)

        # ---- phase 1: recompute the row statistics and x̂ -----------------------------------
        if RMS:
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
            x_hat = x * rstd[:, None]
        else:
            mean = tl.sum(x, axis=1) / N
            x_cent = tl.where(mask, x - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(x_cent * x_cent, axis=1) / N + eps)
            x_hat = x_cent * rstd[:, None]
        x_hat = tl.where(mask, x_hat, 0.0)  # padding rows stay exact zeros (even with eps = 0)

        # ---- phase 2: grad_input -----------------------------------------------------------
        if HAS_WEIGHT:
            dx_hat = g * w[None, :]
        else:
            dx_hat = g
        c1 = tl.sum(x_hat * dx_hat, axis=1) / N
        if RMS:
            dx = (dx_hat - x_hat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(dx_hat, axis=1) / N
            dx = (dx_hat - c2[:, None] - x_hat * c1[:, None]) * rstd[:, None]
        dx_ptrs = dx_base + offs_r[:, None] * stride_dxr + offs_n[None, :]
        tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)

        # ---- phase 3: per-example parameter gradients (running sums over rows) -------------
        if HAS_WEIGHT:
            dw_acc += tl.sum(x_hat * g, axis=0)
        if HAS_BIAS:
            db_acc += tl.sum(g, axis=0)

    # ---- epilogue: this chunk's partial sums --------------------------------------------------
    p_offs = pid_b * stride_pb + pid_c * stride_pc + offs_n
    if HAS_WEIGHT:
        tl.store(dw_ptr + p_offs, dw_acc, mask=mask_n)
    if HAS_BIAS:
        tl.store(db_ptr + p_offs, db_acc, mask=mask_n)


_norm_backward_kernel_tuned = triton.autotune(
    configs=_autotune_configs(), key=["BLOCK_N", "BLOCK_R", "RMS"],
    prune_configs_by={"early_config_prune": _prune_configs})(_norm_backward_kernel)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
def _launch(x, grad_out, weight, *, normalized_shape, eps, rms, has_bias,
            config: dict | None = None):
    """Run the kernel. `config` ({"BLOCK_R": .., "ROWS_PER_PROG": ..}) overrides the tiling."""
    B = x.shape[0]
    N = math.prod(normalized_shape)
    if B > _MAX_GRID_B:
        raise ValueError(f"batch size {B} exceeds {_MAX_GRID_B}; split the batch")
    x3 = x.reshape(B, -1, N).contiguous()  # (B, R, N)
    g3 = grad_out.reshape(B, -1, N).contiguous()
    R = x3.shape[1]
    dx = torch.empty_like(x3)
    has_weight = weight is not None
    w = weight.reshape(N).contiguous() if has_weight else x3  # dummy pointer when absent

    block_n = next_pow2(N)
    block_r = max(1, min(next_pow2(R), _TILE_ELEMENTS // block_n))
    if config:
        block_r = config["BLOCK_R"]
        rows_per_prog = config["ROWS_PER_PROG"]
    else:
        chunks = max(1, min(triton.cdiv(R, block_r), triton.cdiv(_TARGET_PROGRAMS, max(B, 1))))
        rows_per_prog = triton.cdiv(triton.cdiv(R, chunks), block_r) * block_r
    chunks = max(1, triton.cdiv(R, rows_per_prog))

    dw_part = torch.zeros((B, chunks, N), dtype=torch.float32, device=x.device) \
        if has_weight else None
    db_part = torch.zeros((B, chunks, N), dtype=torch.float32, device=x.device) \
        if has_bias else None
    part_dummy = dw_part if dw_part is not None else x3
    if B > 0 and R > 0 and N > 0:
        kernel = _norm_backward_kernel if config else _norm_backward_kernel_tuned
        kernel[(chunks, B)](
            x3, g3, w, dx, part_dummy, db_part if has_bias else part_dummy,
            R, N, rows_per_prog, float(eps),
            x3.stride(0), x3.stride(1),
            g3.stride(0), g3.stride(1),
            dx.stride(0), dx.stride(1),
            chunks * N, N,
            RMS=rms, HAS_WEIGHT=has_weight, HAS_BIAS=has_bias,
            BLOCK_R=block_r, BLOCK_N=block_n,
        )
    grad_input = dx.reshape(x.shape)
    grad_weight = dw_part.sum(1).reshape(B, *normalized_shape) if has_weight else None
    grad_bias = db_part.sum(1).reshape(B, *normalized_shape) if has_bias else None
    return grad_input, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# Torch reference twin (explicit formulas, fp32 or float64 math)
# ---------------------------------------------------------------------------------------------
def norm_layer_backward_torch(x, grad_out, weight, *, normalized_shape, eps, rms, has_bias):
    """Same outputs as `norm_layer_backward`, from the formulas in the module docstring."""
    acc = accum_dtype(x, grad_out, *([weight] if weight is not None else []))
    B = x.shape[0]
    N = math.prod(normalized_shape)
    xf = x.to(acc).reshape(B, -1, N)  # (B, R, N)
    g = grad_out.to(acc).reshape(B, -1, N)
    if rms:
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        x_hat = xf * rstd
    else:
        x_cent = xf - xf.mean(-1, keepdim=True)
        rstd = torch.rsqrt(x_cent.pow(2).mean(-1, keepdim=True) + eps)
        x_hat = x_cent * rstd
    dx_hat = g * weight.to(acc).reshape(N) if weight is not None else g
    dx = dx_hat - x_hat * (x_hat * dx_hat).mean(-1, keepdim=True)
    if not rms:
        dx = dx - dx_hat.mean(-1, keepdim=True)
    grad_input = (dx * rstd).reshape(x.shape).to(x.dtype)
    if weight is None:
        return grad_input, None, None
    grad_weight = (x_hat * g).sum(1).reshape(B, *normalized_shape)
    grad_bias = g.sum(1).reshape(B, *normalized_shape) if has_bias else None
    return grad_input, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def _check_inputs(x, grad_out, weight, normalized_shape, eps, has_bias) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    try:
        normalized_shape = tuple(int(d) for d in normalized_shape)
    except TypeError:
        raise ValueError(f"normalized_shape must be an int or a sequence of ints; "
                         f"got {normalized_shape!r}") from None
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor; got {type(x).__name__}")
    k = len(normalized_shape)
    if x.dim() < k + 1 or tuple(x.shape[-k:]) != normalized_shape:
        raise ValueError(f"x must have shape (B, *, *normalized_shape) with normalized_shape="
                         f"{normalized_shape}; got {tuple(x.shape)}")
    if not isinstance(grad_out, torch.Tensor) or grad_out.shape != x.shape:
        raise ValueError(f"grad_out must have x's shape {tuple(x.shape)}; got "
                         f"{tuple(getattr(grad_out, 'shape', ()))}")
    check_same_device(x=x, grad_out=grad_out)
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != normalized_shape:
            raise ValueError(f"weight must be None or have shape {normalized_shape}; got "
                             f"{tuple(getattr(weight, 'shape', ()))}")
        check_same_device(x=x, weight=weight)
    elif has_bias:
        raise ValueError("has_bias=True needs weight (a norm layer without elementwise_affine "
                         "has no bias); pass has_bias=False")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative float; got {eps!r}")
    return normalized_shape


def norm_layer_backward(
    x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor | None, *,
    normalized_shape, eps: float, rms: bool, has_bias: bool, impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward of LayerNorm/RMSNorm: grad_input and per-example weight and bias gradients.

    Args:
        x: (B, *, *normalized_shape) the layer's input.
        grad_out: gradient of the layer's output, x's shape.
        weight: the affine weight (normalized_shape), or None without elementwise_affine.
        normalized_shape: int or tuple, as given to nn.LayerNorm / RMSNorm.
        eps: the layer's eps.
        rms: True for RMSNorm (no centering), False for LayerNorm.
        has_bias: whether the layer has a bias (needs weight).
        impl: "auto" (Triton on CUDA, else torch), "triton" or "torch".

    Returns:
        (grad_input with x's shape and dtype,
         per-example weight grads (B, *normalized_shape) float32, or None when weight is None,
         per-example bias grads (B, *normalized_shape) float32, or None without a bias);
        float64 instead of float32 for float64 inputs.

    Raises:
        ValueError: bad shapes, devices, eps or flags; see dispatch.resolve_impl for `impl`.
    """
    normalized_shape = _check_inputs(x, grad_out, weight, normalized_shape, eps, has_bias)
    tensors = (x, grad_out) + ((weight,) if weight is not None else ())
    path = resolve_impl(impl, *tensors)
    if path == "triton" and math.prod(normalized_shape) > _MAX_TRITON_N:
        if impl == "triton":
            raise ValueError(f"impl='triton' supports prod(normalized_shape) <= {_MAX_TRITON_N}; "
                             f"got {math.prod(normalized_shape)}: use impl='torch'")
        path = "torch"
    kwargs = dict(normalized_shape=normalized_shape, eps=eps, rms=rms, has_bias=has_bias)
    if path == "torch":
        return norm_layer_backward_torch(x, grad_out, weight, **kwargs)
    grad_input, grad_weight, grad_bias = _launch(x, grad_out, weight, **kwargs)
    if weight is None:
        return grad_input, None, None
    return grad_input, grad_weight, grad_bias


__all__ = ["norm_layer_backward", "norm_layer_backward_torch"]
