"""Per-example norms, tied cross terms and clipped gradients of an embedding table.

An embedding with ids x_i (T,) and output gradient g_i (T, D) has the per-example gradient
G_i = Σ_t onehot(x_{i,t}) ⊗ g_{i,t} (V × D): row v sums the gradients of the positions holding v.
Positions whose id is `padding_idx` contribute nothing (nn.Embedding never updates that row).

Everything here starts from the example's own rows: `embedding_groups` sums the gradients of each
(example, id) pair first, in float64 (h_{i,v} = Σ_{t: x_t = v} g_t, exact to float64 rounding and
never overflowing for fp32/bf16 input). Then

- `embedding_norm_sq`:      ‖G_i‖² = Σ_v ‖h_{i,v}‖², squares of the very rows that are released;
- `embedding_clipped_grad`: Σ_i scale[i] · G_i = rows h_{i,v} scaled and added into the table, in
  float64: one example's rows, however large or cancelling, cannot absorb another's;
- `embedding_dense_inner`:  ⟨G_e, G_h⟩ = Σ_t g_e,t · (Σ_s left[s, x_t] right_s), the cross term of
  an embedding tied to an LM head whose gradient is G_h = Σ_s left_s ⊗ right_s (left: grad over the
  vocabulary, right: the head's input) (docs/design.md §3, tied parameters), with an error bound.

Why no Gram form Σ_{t,s} 1[x_t = x_s] (g_t·g_s) and no per-position scatter (what earlier versions
and their Triton kernels did): the Gram form cancels catastrophically (g and −(1−δ)g on one id give
0 where the norm is δ‖g‖), and adding scale[i]·g_{i,t} position by position into a shared row lets
+M·a and −M·a of one example wipe out what other examples had added (docs/design.md §3, "Floating
point"). The grouped form costs a sort of the B·T (example, id) keys and one pass over the rows, on
any device; it is exact where the others were fast.
"""

from typing import NamedTuple

import torch

from ._checks import (Estimate, accum_dtype, check_dim, check_ids_range, check_padding_idx,
                      check_same_device, check_scale, check_tensor, exact_fp32_matmul, gamma,
                      row_norms)


class EmbeddingGroups(NamedTuple):
    """The (example, id) groups of an embedding use: ``example`` and ``ids`` (U,) int64, ``sums``
    (U, D) float64, the summed gradient rows h_{i,v} (padding positions left out)."""

    example: torch.Tensor
    ids: torch.Tensor
    sums: torch.Tensor


def _check_ids_grad(ids, grad, grad_name="grad"):
    check_tensor("ids", ids, ndim=2, floating=False)
    check_tensor(grad_name, grad, ndim=3)
    check_same_device(ids=ids, **{grad_name: grad})
    check_dim(f"{grad_name}.shape[0]", grad.shape[0], "ids.shape[0]", ids.shape[0])
    check_dim(f"{grad_name}.shape[1]", grad.shape[1], "ids.shape[1]", ids.shape[1])


def _keep_mask(ids, padding_idx):
    flat = ids.reshape(-1)
    if padding_idx is None:
        return torch.ones_like(flat, dtype=torch.bool)
    return flat != padding_idx


def embedding_groups(ids: torch.Tensor, grad: torch.Tensor, *,
                     padding_idx: int | None = None) -> EmbeddingGroups:
    """Sum each example's gradient rows per id, in float64 (module docstring).

    Args:
        ids: (B, T) int64 token ids.
        grad: (B, T, D) gradient of the embedding output.
        padding_idx: id whose positions contribute nothing, or None.

    Returns:
        ``EmbeddingGroups``; rows of one example are contiguous, examples in order.

    Raises:
        ValueError: bad shapes, dims, devices, dtypes or padding_idx.
    """
    _check_ids_grad(ids, grad)
    check_padding_idx(padding_idx)
    B, T, D = grad.shape
    keep = _keep_mask(ids, padding_idx)
    example = torch.arange(B, device=ids.device).repeat_interleave(T)
    keys = torch.stack([example, ids.reshape(-1).long()], dim=1)[keep]  # (rows, 2)
    groups, group_of_row = torch.unique(keys, dim=0, return_inverse=True)  # sorted by example
    sums = torch.zeros((groups.shape[0], D), dtype=torch.float64, device=grad.device)
    sums.index_add_(0, group_of_row, grad.reshape(B * T, D)[keep].double())
    return EmbeddingGroups(groups[:, 0], groups[:, 1], sums)


def groups_norm_sq(groups: EmbeddingGroups, batch: int) -> torch.Tensor:
    """‖G_i‖² = Σ_v ‖h_{i,v}‖² per example, (B,) float64 (relative error below 2^-50)."""
    out = torch.zeros(batch, dtype=torch.float64, device=groups.sums.device)
    return out.index_add_(0, groups.example, groups.sums.pow(2).sum(dim=1))


def groups_clipped_grad(groups: EmbeddingGroups, scale: torch.Tensor,
                        num_embeddings: int) -> torch.Tensor:
    """Σ_i scale[i] G_i from the groups: (V, D) float64."""
    scaled = groups.sums * scale.double()[groups.example].unsqueeze(1)
    out = torch.zeros((num_embeddings, groups.sums.shape[1]), dtype=torch.float64,
                      device=groups.sums.device)
    return out.index_add_(0, groups.ids, scaled)


def embedding_norm_sq(ids: torch.Tensor, grad: torch.Tensor, *,
                      padding_idx: int | None = None) -> torch.Tensor:
    """Per-example ‖G_i‖² of an embedding, padding excluded.

    Args:
        ids: (B, T) int64 token ids.
        grad: (B, T, D) gradient of the embedding output.
        padding_idx: id whose positions contribute nothing (nn.Embedding.padding_idx), or None.

    Returns:
        (B,) float32 (float64 for float64 grads).

    Raises:
        ValueError: bad shapes, dims, devices, dtypes or padding_idx.
    """
    groups = embedding_groups(ids, grad, padding_idx=padding_idx)
    return groups_norm_sq(groups, ids.shape[0]).to(accum_dtype(grad))


def embedding_clipped_grad(ids: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, *,
                           num_embeddings: int, padding_idx: int | None = None) -> torch.Tensor:
    """Σ_i scale[i] · Σ_t onehot(x_{i,t}) ⊗ g_{i,t}: the clipped embedding gradient.

    Args:
        ids: (B, T) int64 ids, in [0, num_embeddings).
        grad: (B, T, D) gradient of the embedding output.
        scale: (B,) per-example factors.
        num_embeddings: V, rows of the table.
        padding_idx: id whose row gets nothing, or None.

    Returns:
        (V, D) float32 (float64 for float64 grads).

    Raises:
        ValueError: bad shapes, dims, devices, dtypes, ids out of range, num_embeddings or
            padding_idx.
    """
    _check_ids_grad(ids, grad)
    check_scale(scale, ids.shape[0], ids.device)
    if isinstance(num_embeddings, bool) or not isinstance(num_embeddings, int) \
            or num_embeddings < 1:
        raise ValueError(f"num_embeddings must be a positive int; got {num_embeddings!r}")
    check_padding_idx(padding_idx, num_embeddings)
    check_ids_range(ids, num_embeddings)
    groups = embedding_groups(ids, grad, padding_idx=padding_idx)
    return groups_clipped_grad(groups, scale, num_embeddings).to(accum_dtype(grad))


def embedding_dense_inner_bounded(ids: torch.Tensor, grad_e: torch.Tensor, left: torch.Tensor,
                                  right: torch.Tensor, *,
                                  padding_idx: int | None = None) -> Estimate:
    """Per-example ⟨G_e, G_h⟩ of an embedding tied to a linear LM head, with an error bound.

    Σ_t grad_e_t · Σ_s left[s, x_t] right_s, where G_e = Σ_t onehot(x_t) ⊗ grad_e_t and
    G_h = Σ_s left_s ⊗ right_s are both (V, D). The head's rows at the embedding's ids come from an
    S-term sum in the accumulation dtype, off by at most γ_S Σ_s |left[s, x_t]| ‖right_s‖; the dot
    products and the sum over t run in float64. So |value − exact| <= (γ_S + γ64) E with
    E = Σ_{t,s} ‖grad_e_t‖ |left[s, x_t]| ‖right_s‖, small next to K_e K_h when the vocabulary
    gradient is spread out (a softmax).

    Args:
        ids: (B, T) int64 embedding ids, in [0, V).
        grad_e: (B, T, D) gradient of the embedding output.
        left: (B, S, V) gradient of the head's output (logits).
        right: (B, S, D) the head's input.
        padding_idx: embedding id whose positions t are skipped, or None.

    Returns:
        ``Estimate(value, error)``, both (B,) float64.

    Raises:
        ValueError: bad shapes, dims, devices, dtypes, ids out of range or padding_idx.
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
    acc = accum_dtype(grad_e, left, right)
    B, T = ids.shape
    S = left.shape[1]
    gathered = left.to(acc).gather(2, ids.long()[:, None, :].expand(B, S, T))  # (B, S, T)
    if padding_idx is not None:
        gathered = gathered * (ids != padding_idx)[:, None, :].to(acc)
    with exact_fp32_matmul():
        head_rows = torch.einsum("bst,bsd->btd", gathered, right.to(acc))  # G_h[x_t]: (B, T, D)
    value = (head_rows.double() * grad_e.double()).sum(dim=(1, 2))
    spread = torch.einsum("bst,bt,bs->b", gathered.double().abs(), row_norms(grad_e),
                          row_norms(right))
    error = (gamma(S, acc) + gamma(T * grad_e.shape[2] + 1, torch.float64)) * spread
    return Estimate(value, error)


__all__ = ["EmbeddingGroups", "embedding_clipped_grad", "embedding_dense_inner_bounded",
           "embedding_groups", "embedding_norm_sq", "groups_clipped_grad", "groups_norm_sq"]
