"""Per-example norms, tied cross terms and clipped gradients of an embedding table.

An embedding with ids x_i (T,) and output gradient g_i (T, D) has the per-example gradient
G_i = Σ_t onehot(x_{i,t}) ⊗ g_{i,t} (V × D): row v sums the gradients of the positions holding v.
Positions whose id is `padding_idx` contribute nothing (nn.Embedding never updates that row).

- `embedding_norm_sq`:      ‖G_i‖² = Σ_{t,s} 1[x_t = x_s] (g_t·g_s)
- `embedding_dense_inner`:  ⟨G_e, G_h⟩ = Σ_{t,s} left[s, x_t] (g_e,t·right_s), the cross term of an
  embedding tied to an LM head whose gradient is G_h = Σ_s left_s ⊗ right_s (left: grad over the
  vocabulary, right: the head's input) (docs/design.md §3, tied parameters).
- `embedding_clipped_grad`: Σ_{i,t} scale[i] · onehot(x_{i,t}) ⊗ g_{i,t}, the clipped sum (V × D).

Kernels: the two norm-type ops tile over (t, s) blocks like ghost_norm.py: per tile a (BLOCK_T ×
BLOCK_T) Gram tile of gradients is built on chip and masked by id equality (norm) or multiplied by
the gathered vocabulary gradients left[s, x_t] (cross term); nothing T×T or V-sized reaches memory.
The norm skips tiles with no equal-id pair (e.g. all padding) and, being symmetric, walks only
s-blocks at or after its own t-block. The clipped gradient is a scatter: each program scales a block
of gradient rows and adds them to their table rows with fp32 atomics (the order of the additions, so
the last bits, may vary from run to run).
"""

import torch

from ._checks import (accum_dtype, check_dim, check_ids_range, check_padding_idx,
                      check_same_device, check_scale, check_tensor, dot_precision, next_pow2)
from ._compat import INTERPRETING_AT_IMPORT, tl, triton
from .dispatch import resolve_impl

# ---------------------------------------------------------------------------------------------
# Autotune configs. Pair kernels: (BLOCK_T, BLOCK_D, num_warps, num_stages), keyed on padded T
# and D. Scatter kernel: (BLOCK_R, BLOCK_D, num_warps). The interpreter gets one small config each.
# ---------------------------------------------------------------------------------------------
# Registers and spills for sm_90 are checked in CI (tests/kernels/test_kernels_sm90_compile.py):
# none of these spill.
_GPU_PAIR_CONFIGS = [(32, 32, 4, 4), (32, 64, 4, 3), (64, 32, 8, 3), (64, 64, 8, 3)]
_INTERPRETER_PAIR_CONFIGS = [(16, 16, 1, 1)]
_PAIR_CONFIGS = _INTERPRETER_PAIR_CONFIGS if INTERPRETING_AT_IMPORT else _GPU_PAIR_CONFIGS
_MIN_BLOCK_T = min(c[0] for c in _PAIR_CONFIGS)

_GPU_SCATTER_CONFIGS = [(16, 128, 4), (32, 128, 4), (32, 256, 8), (64, 64, 4)]
_INTERPRETER_SCATTER_CONFIGS = [(16, 16, 1)]
_SCATTER_CONFIGS = _INTERPRETER_SCATTER_CONFIGS if INTERPRETING_AT_IMPORT else _GPU_SCATTER_CONFIGS
_MAX_GRID_B = 65535  # CUDA limit of grid axis 1, which indexes examples


def _pair_configs():
    return [triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for bt, bd, w, s in _PAIR_CONFIGS]


def _scatter_configs():
    return [triton.Config({"BLOCK_R": br, "BLOCK_D": bd}, num_warps=w)
            for br, bd, w in _SCATTER_CONFIGS]


# ---------------------------------------------------------------------------------------------
# Kernel 1: Σ_{t,s} 1[x_t = x_s] (g_t·g_s)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _embedding_norm_kernel(
    ids_ptr, grad_ptr, out_ptr,
    T, D, PAD,
    stride_ib, stride_it,
    stride_gb, stride_gt, stride_gd,
    stride_outb,
    T_BUCKET,  # autotune key only
    HAS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # cast dot operands to fp32 (the interpreter mis-handles bf16 dots)
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    t_start = pid_t * BLOCK_T
    offs_t = t_start + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    ids_base = ids_ptr + pid_b * stride_ib
    grad_base = grad_ptr + pid_b * stride_gb

    ids_t = tl.load(ids_base + offs_t * stride_it, mask=mask_t, other=0)
    valid_t = mask_t
    if HAS_PAD:
        valid_t = valid_t & (ids_t != PAD)

    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)  # row sums of the accumulated tiles
    for s_start in range(t_start, T, BLOCK_T):  # symmetric: s-blocks at or after this t-block
        offs_s = s_start + tl.arange(0, BLOCK_T)
        mask_s = offs_s < T
        ids_s = tl.load(ids_base + offs_s * stride_it, mask=mask_s, other=0)
        valid_s = mask_s
        if HAS_PAD:
            valid_s = valid_s & (ids_s != PAD)

        # ---- phase 1: which (t, s) pairs share an id; skip the tile when none do ------------
        same = (ids_t[:, None] == ids_s[None, :]) & valid_t[:, None] & valid_s[None, :]
        if tl.max(same.to(tl.int32)) > 0:
            # ---- phase 2: gradient Gram tile GG[t, s] = g_t · g_s, reduced over D ----------
            gg = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
            gt_ptrs = grad_base + offs_t[:, None] * stride_gt + offs_d[None, :] * stride_gd
            gs_ptrs = grad_base + offs_d[:, None] * stride_gd + offs_s[None, :] * stride_gt
            for d_start in range(0, D, BLOCK_D):
                mask_d = offs_d < D - d_start
                a = tl.load(gt_ptrs, mask=mask_t[:, None] & mask_d[None, :], other=0.0)
                b = tl.load(gs_ptrs, mask=mask_d[:, None] & mask_s[None, :], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                gg = tl.dot(a, b, gg, input_precision=DOT_PRECISION)
                gt_ptrs += BLOCK_D * stride_gd
                gs_ptrs += BLOCK_D * stride_gd
            # ---- phase 3: keep equal-id pairs; an off-diagonal tile counts for its transpose --
            weight = 1.0 + (s_start > t_start).to(tl.float32)
            acc += tl.sum(tl.where(same, gg, 0.0), axis=1) * weight

    tl.store(out_ptr + pid_b * stride_outb + pid_t, tl.sum(acc))


_embedding_norm_kernel_tuned = triton.autotune(
    configs=_pair_configs(), key=["T_BUCKET", "D"])(_embedding_norm_kernel)


# ---------------------------------------------------------------------------------------------
# Kernel 2: Σ_{t,s} left[s, x_t] (g_e,t · right_s)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _embedding_dense_kernel(
    ids_ptr, ge_ptr, left_ptr, right_ptr, out_ptr,
    T, S, D, PAD,
    stride_ib, stride_it,
    stride_eb, stride_et, stride_ed,
    stride_lb, stride_ls, stride_lv,
    stride_rb, stride_rs, stride_rd,
    stride_outb,
    T_BUCKET,  # autotune key only
    HAS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    ge_base = ge_ptr + pid_b * stride_eb
    left_base = left_ptr + pid_b * stride_lb
    right_base = right_ptr + pid_b * stride_rb

    ids_t = tl.load(ids_ptr + pid_b * stride_ib + offs_t * stride_it, mask=mask_t, other=0)
    valid_t = mask_t
    if HAS_PAD:
        valid_t = valid_t & (ids_t != PAD)

    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)  # row sums of the accumulated tiles
    for s_start in range(0, S, BLOCK_T):
        offs_s = s_start + tl.arange(0, BLOCK_T)
        mask_s = offs_s < S

        # ---- phase 1: ER[t, s] = g_e,t · right_s, reduced over D ---------------------------
        er = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
        e_ptrs = ge_base + offs_t[:, None] * stride_et + offs_d[None, :] * stride_ed  # (T, D)
        r_ptrs = right_base + offs_d[:, None] * stride_rd + offs_s[None, :] * stride_rs  # (D, S)
        for d_start in range(0, D, BLOCK_D):
            mask_d = offs_d < D - d_start
            a = tl.load(e_ptrs, mask=mask_t[:, None] & mask_d[None, :], other=0.0)
            b = tl.load(r_ptrs, mask=mask_d[:, None] & mask_s[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            er = tl.dot(a, b, er, input_precision=DOT_PRECISION)
            e_ptrs += BLOCK_D * stride_ed
            r_ptrs += BLOCK_D * stride_rd

        # ---- phase 2: gather the head's vocabulary gradient at the embedding's ids ----------
        lg_ptrs = left_base + offs_s[None, :] * stride_ls + ids_t[:, None] * stride_lv  # (T, S)
        lg = tl.load(lg_ptrs, mask=valid_t[:, None] & mask_s[None, :], other=0.0)
        acc += tl.sum(er * lg.to(tl.float32), axis=1)

    tl.store(out_ptr + pid_b * stride_outb + pid_t, tl.sum(acc))


_embedding_dense_kernel_tuned = triton.autotune(
    configs=_pair_configs(), key=["T_BUCKET", "D"])(_embedding_dense_kernel)


# ---------------------------------------------------------------------------------------------
# Kernel 3: out[x_{i,t}] += scale[i] · g_{i,t}
# ---------------------------------------------------------------------------------------------
@triton.jit
def _embedding_grad_kernel(
    ids_ptr, grad_ptr, scale_ptr, out_ptr,
    T, D, ROWS, PAD,
    stride_ib, stride_it,
    stride_gb, stride_gt, stride_gd,
    stride_s, stride_ov, stride_od,
    HAS_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_r = rows < ROWS
    mask_d = offs_d < D
    ex = rows // T
    pos = rows - ex * T

    # ---- phase 1: ids, factors and scaled gradient rows ----------------------------------------
    ids = tl.load(ids_ptr + ex * stride_ib + pos * stride_it, mask=mask_r, other=0)
    valid = mask_r
    if HAS_PAD:
        valid = valid & (ids != PAD)
    s = tl.load(scale_ptr + ex * stride_s, mask=mask_r, other=0.0).to(tl.float32)
    g_ptrs = grad_ptr + ex[:, None] * stride_gb + pos[:, None] * stride_gt \
        + offs_d[None, :] * stride_gd
    g = tl.load(g_ptrs, mask=mask_r[:, None] & mask_d[None, :], other=0.0).to(tl.float32)

    # ---- phase 2: scatter-add into the table rows -----------------------------------------------
    out_ptrs = out_ptr + ids[:, None] * stride_ov + offs_d[None, :] * stride_od
    tl.atomic_add(out_ptrs, g * s[:, None], mask=valid[:, None] & mask_d[None, :])


_embedding_grad_kernel_tuned = triton.autotune(
    configs=_scatter_configs(), key=["D"], reset_to_zero=["out_ptr"])(_embedding_grad_kernel)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _pad_args(padding_idx):
    return (-1, False) if padding_idx is None else (int(padding_idx), True)


def _launch_norm(ids, grad, padding_idx, *, config: dict | None = None) -> torch.Tensor:
    B, T, D = grad.shape
    if B > _MAX_GRID_B:
        raise ValueError(f"batch size {B} exceeds {_MAX_GRID_B}; split the batch")
    pad, has_pad = _pad_args(padding_idx)
    min_block = config["BLOCK_T"] if config else _MIN_BLOCK_T
    partial = torch.zeros((B, max(1, triton.cdiv(T, min_block))), dtype=torch.float32,
                          device=grad.device)
    if B > 0 and T > 0:
        kernel = _embedding_norm_kernel if config else _embedding_norm_kernel_tuned
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), B)  # noqa: E731
        kernel[grid](
            ids, grad, partial,
            T, D, pad,
            ids.stride(0), ids.stride(1),
            grad.stride(0), grad.stride(1), grad.stride(2),
            partial.stride(0),
            next_pow2(T),
            HAS_PAD=has_pad, DOT_PRECISION=dot_precision(grad.dtype), UPCAST=INTERPRETING_AT_IMPORT,
            **(config or {}),
        )
    return partial.sum(1)


def _launch_dense(ids, grad_e, left, right, padding_idx, *,
                  config: dict | None = None) -> torch.Tensor:
    B, T, D = grad_e.shape
    S = right.shape[1]
    if B > _MAX_GRID_B:
        raise ValueError(f"batch size {B} exceeds {_MAX_GRID_B}; split the batch")
    dtype = torch.promote_types(grad_e.dtype, right.dtype)
    grad_e, right = grad_e.to(dtype), right.to(dtype)
    pad, has_pad = _pad_args(padding_idx)
    min_block = config["BLOCK_T"] if config else _MIN_BLOCK_T
    partial = torch.zeros((B, max(1, triton.cdiv(T, min_block))), dtype=torch.float32,
                          device=grad_e.device)
    if B > 0 and T > 0 and S > 0:
        kernel = _embedding_dense_kernel if config else _embedding_dense_kernel_tuned
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), B)  # noqa: E731
        kernel[grid](
            ids, grad_e, left, right, partial,
            T, S, D, pad,
            ids.stride(0), ids.stride(1),
            grad_e.stride(0), grad_e.stride(1), grad_e.stride(2),
            left.stride(0), left.stride(1), left.stride(2),
            right.stride(0), right.stride(1), right.stride(2),
            partial.stride(0),
            next_pow2(max(T, S)),
            HAS_PAD=has_pad, DOT_PRECISION=dot_precision(dtype), UPCAST=INTERPRETING_AT_IMPORT,
            **(config or {}),
        )
    return partial.sum(1)


def _launch_grad(ids, grad, scale, num_embeddings, padding_idx, *,
                 config: dict | None = None) -> torch.Tensor:
    B, T, D = grad.shape
    pad, has_pad = _pad_args(padding_idx)
    scale = scale.to(torch.float32)
    out = torch.zeros((num_embeddings, D), dtype=torch.float32, device=grad.device)
    rows = B * T
    if rows > 0 and D > 0:
        kernel = _embedding_grad_kernel if config else _embedding_grad_kernel_tuned
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(D, meta["BLOCK_D"]))
        kernel[grid](
            ids, grad, scale, out,
            T, D, rows, pad,
            ids.stride(0), ids.stride(1),
            grad.stride(0), grad.stride(1), grad.stride(2),
            scale.stride(0), out.stride(0), out.stride(1),
            HAS_PAD=has_pad,
            **(config or {}),
        )
    return out


def _check_ids_grad(ids, grad, grad_name="grad"):
    check_tensor("ids", ids, ndim=2, floating=False)
    check_tensor(grad_name, grad, ndim=3)
    check_same_device(ids=ids, **{grad_name: grad})
    check_dim(f"{grad_name}.shape[0]", grad.shape[0], "ids.shape[0]", ids.shape[0])
    check_dim(f"{grad_name}.shape[1]", grad.shape[1], "ids.shape[1]", ids.shape[1])


# ---------------------------------------------------------------------------------------------
# Torch reference twins (no T×T or B×V×D tensors either: segment sums and gathers)
# ---------------------------------------------------------------------------------------------
def _keep_mask(ids, padding_idx):
    flat = ids.reshape(-1)
    if padding_idx is None:
        return torch.ones_like(flat, dtype=torch.bool)
    return flat != padding_idx


def embedding_norm_sq_torch(ids, grad, padding_idx=None) -> torch.Tensor:
    """Σ_v ‖Σ_{t: x_t = v} g_t‖² per example: sum the gradients of each (example, id) group."""
    acc = accum_dtype(grad)
    B, T, D = grad.shape
    keep = _keep_mask(ids, padding_idx)
    example = torch.arange(B, device=ids.device).repeat_interleave(T)
    keys = torch.stack([example, ids.reshape(-1).long()], dim=1)[keep]  # (rows, 2)
    groups, group_of_row = torch.unique(keys, dim=0, return_inverse=True)
    sums = torch.zeros((groups.shape[0], D), dtype=acc, device=grad.device)
    sums.index_add_(0, group_of_row, grad.reshape(B * T, D)[keep].to(acc))
    out = torch.zeros(B, dtype=acc, device=grad.device)
    return out.index_add_(0, groups[:, 0], sums.pow(2).sum(dim=1))


def embedding_dense_inner_torch(ids, grad_e, left, right, padding_idx=None) -> torch.Tensor:
    """Σ_t g_e,t · (Σ_s left[s, x_t] right_s) per example, via a (B, S, T) gather of `left`."""
    acc = accum_dtype(grad_e, left, right)
    B, T = ids.shape
    S = left.shape[1]
    gathered = left.to(acc).gather(2, ids.long()[:, None, :].expand(B, S, T))  # (B, S, T)
    if padding_idx is not None:
        gathered = gathered * (ids != padding_idx)[:, None, :].to(acc)
    head_rows = torch.einsum("bst,bsd->btd", gathered, right.to(acc))  # G_h[x_t] per t: (B, T, D)
    return (head_rows * grad_e.to(acc)).sum(dim=(1, 2))


def embedding_clipped_grad_torch(ids, grad, scale, num_embeddings, padding_idx=None):
    """index_add of scale[i]·g_{i,t} into row x_{i,t}, in fp32 (float64 for float64 grads)."""
    acc = accum_dtype(grad)
    B, T, D = grad.shape
    keep = _keep_mask(ids, padding_idx)
    scaled = (grad.to(acc) * scale.to(acc).view(B, 1, 1)).reshape(B * T, D)
    out = torch.zeros((num_embeddings, D), dtype=acc, device=grad.device)
    return out.index_add_(0, ids.reshape(-1).long()[keep], scaled[keep])


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def embedding_norm_sq(ids: torch.Tensor, grad: torch.Tensor, *, padding_idx: int | None = None,
                      impl: str = "auto") -> torch.Tensor:
    """Per-example ‖G_i‖² of an embedding: Σ_{t,s} 1[x_t = x_s] (g_t·g_s), padding excluded.

    Args:
        ids: (B, T) int64 token ids.
        grad: (B, T, D) gradient of the embedding output.
        padding_idx: id whose positions contribute nothing (nn.Embedding.padding_idx), or None.
        impl: "auto" (Triton on CUDA, else torch), "triton" or "torch".

    Returns:
        (B,) float32 (float64 for float64 grads).

    Raises:
        ValueError: bad shapes, dims, devices, dtypes or padding_idx; see resolve_impl for `impl`.
    """
    _check_ids_grad(ids, grad)
    check_padding_idx(padding_idx)
    if resolve_impl(impl, ids, grad) == "torch":
        return embedding_norm_sq_torch(ids, grad, padding_idx)
    return _launch_norm(ids, grad, padding_idx)


def embedding_dense_inner(ids: torch.Tensor, grad_e: torch.Tensor, left: torch.Tensor,
                          right: torch.Tensor, *, padding_idx: int | None = None,
                          impl: str = "auto") -> torch.Tensor:
    """Per-example ⟨G_e, G_h⟩ of an embedding tied to a linear LM head.

    Σ_{t,s} left[s, x_t] (grad_e_t · right_s), where G_e = Σ_t onehot(x_t) ⊗ grad_e_t and
    G_h = Σ_s left_s ⊗ right_s are both (V, D).

    Args:
        ids: (B, T) int64 embedding ids, in [0, V).
        grad_e: (B, T, D) gradient of the embedding output.
        left: (B, S, V) gradient of the head's output (logits).
        right: (B, S, D) the head's input.
        padding_idx: embedding id whose positions t are skipped, or None.
        impl: "auto", "triton" or "torch".

    Returns:
        (B,) float32 (float64 for float64 inputs).

    Raises:
        ValueError: bad shapes, dims, devices, dtypes, ids out of range or padding_idx; `impl`.
    """
    _check_ids_grad(ids, grad_e, "grad_e")
    check_tensor("left", left, ndim=3)
    check_tensor("right", right, ndim=3)
    check_same_device(ids=ids, left=left, right=right)
    check_dim("left.shape[0]", left.shape[0], "ids.shape[0]", ids.shape[0])
    check_dim("right.shape[0]", right.shape[0], "ids.shape[0]", ids.shape[0])
    check_dim("right.shape[1]", right.shape[1], "left.shape[1]", left.shape[1])
    check_dim("right.shape[2]", right.shape[2], "grad_e.shape[2]", grad_e.shape[2])
    check_padding_idx(padding_idx, left.shape[2])
    check_ids_range(ids, left.shape[2])
    if resolve_impl(impl, ids, grad_e, left, right) == "torch":
        return embedding_dense_inner_torch(ids, grad_e, left, right, padding_idx)
    return _launch_dense(ids, grad_e, left, right, padding_idx)


def embedding_clipped_grad(ids: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, *,
                           num_embeddings: int, padding_idx: int | None = None,
                           impl: str = "auto") -> torch.Tensor:
    """Σ_{i,t} scale[i] · onehot(x_{i,t}) ⊗ g_{i,t}: the clipped embedding gradient.

    Args:
        ids: (B, T) int64 ids, in [0, num_embeddings).
        grad: (B, T, D) gradient of the embedding output.
        scale: (B,) float32 per-example factors.
        num_embeddings: V, rows of the table.
        padding_idx: id whose row gets nothing, or None.
        impl: "auto", "triton" or "torch".

    Returns:
        (V, D) float32 (float64 for float64 grads). The Triton path adds with atomics: its last
        bits may differ between runs.

    Raises:
        ValueError: bad shapes, dims, devices, dtypes, ids out of range, num_embeddings or
            padding_idx; `impl`.
    """
    _check_ids_grad(ids, grad)
    check_scale(scale, ids.shape[0], ids.device)
    if isinstance(num_embeddings, bool) or not isinstance(num_embeddings, int) \
            or num_embeddings < 1:
        raise ValueError(f"num_embeddings must be a positive int; got {num_embeddings!r}")
    check_padding_idx(padding_idx, num_embeddings)
    check_ids_range(ids, num_embeddings)
    if resolve_impl(impl, ids, grad, scale) == "torch":
        return embedding_clipped_grad_torch(ids, grad, scale, num_embeddings, padding_idx)
    return _launch_grad(ids, grad, scale, num_embeddings, padding_idx)


__all__ = ["embedding_clipped_grad", "embedding_clipped_grad_torch", "embedding_dense_inner",
           "embedding_dense_inner_torch", "embedding_norm_sq", "embedding_norm_sq_torch"]
