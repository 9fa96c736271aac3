"""Per-example gradients in the form each layer rule hands over, and the three things done with them.

A layer's backward gives, for each trainable parameter it uses, one *piece*: a compact form of that
use's per-example gradients. The clipping code needs three operations on pieces:

- ``norm_sq(piece)``: per-example squared norms ``(B,)``;
- ``inner(p, q)``: per-example inner products of two pieces of the SAME parameter (a parameter used
  more than once, e.g. tied embeddings: ||sum_u G^u||^2 = sum_{u,v} <G^u, G^v>, DESIGN §3);
- ``weighted_sum(piece, w)``: sum_i w_i G_i, the clipped gradient, without materializing G_i.

Forms:
- ``FactorPiece``: G_i = sum_t left[i,t] (x) right[i,t] viewed as (rows of) the parameter. Linear,
  Conv1D, unfolded convolutions and attention projections. Norms by ghost or direct kernels.
- ``OnehotPiece``: an embedding lookup, G_i = sum_t onehot(ids[i,t]) (x) grad[i,t].
- ``DensePiece``: the per-example gradients themselves ``(B, *param.shape)``; small parameters
  (norm layers, biases) and the torch.func fallback.

The kernels (``dpfused.kernels``) compute the heavy parts; they pick Triton on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpfused import kernels

__all__ = ["FactorPiece", "OnehotPiece", "DensePiece", "Piece", "norm_sq", "inner", "weighted_sum",
           "compact"]


@dataclass
class FactorPiece:
    """G_i = sum_t left[i, t] (x) right[i, t], a (rows, cols) matrix placed in the parameter.

    Attributes:
        param: the parameter this gradient belongs to.
        left: ``(B, T, m)``; for nn.Linear the output gradient.
        right: ``(B, T, n)``; for nn.Linear the input activations.
        rows: where the (m, n) matrix sits in ``param`` viewed as ``(param.shape[0], -1)``; None for
            all of it. Used by grouped convolutions and cross-attention in_proj slices.
    """

    param: torch.nn.Parameter
    left: torch.Tensor
    right: torch.Tensor
    rows: slice | None = None
    path: str = ""  # "ghost" | "direct", filled by norm_sq for explain()

    @property
    def batch_size(self) -> int:
        return self.left.shape[0]

    def materialize(self) -> torch.Tensor:
        """(B, *param.shape) per-example gradients. Only for rare cases (shared, sliced)."""
        # Under autocast the saved input may be float32 next to a bf16 output gradient: einsum
        # needs one dtype, and the product is summed over T, so take at least float32.
        dtype = torch.promote_types(torch.promote_types(self.left.dtype, self.right.dtype),
                                    torch.float32)
        per_example = torch.einsum("btm,btn->bmn", self.left.to(dtype), self.right.to(dtype))
        return _place_rows(per_example, self.param, self.rows)


@dataclass
class OnehotPiece:
    """An embedding use: G_i = sum_t onehot(ids[i, t]) (x) grad[i, t]; padding rows excluded."""

    param: torch.nn.Parameter
    ids: torch.Tensor  # (B, T) int64
    grad: torch.Tensor  # (B, T, D)
    padding_idx: int | None = None

    @property
    def batch_size(self) -> int:
        return self.ids.shape[0]

    def materialize(self) -> torch.Tensor:
        batch, _, dim = self.grad.shape
        out = self.grad.new_zeros(batch, self.param.shape[0], dim)
        grad = self._masked_grad()
        out.scatter_add_(1, self.ids.unsqueeze(-1).expand(-1, -1, dim), grad)
        return out

    def _masked_grad(self) -> torch.Tensor:
        if self.padding_idx is None:
            return self.grad
        return self.grad * (self.ids != self.padding_idx).unsqueeze(-1).to(self.grad.dtype)


@dataclass
class DensePiece:
    """Per-example gradients as they are: ``(B, *param.shape)``."""

    param: torch.nn.Parameter
    grads: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.grads.shape[0]

    def materialize(self) -> torch.Tensor:
        return self.grads


Piece = FactorPiece | OnehotPiece | DensePiece


def _accum_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _place_rows(per_example: torch.Tensor, param: torch.Tensor, rows: slice | None) -> torch.Tensor:
    batch = per_example.shape[0]
    if rows is None:
        return per_example.reshape(batch, *param.shape)
    full = per_example.new_zeros(batch, param.shape[0], param[0].numel())
    full[:, rows] = per_example.reshape(batch, rows.stop - rows.start, -1)
    return full.reshape(batch, *param.shape)


def compact(piece: Piece) -> Piece:
    """The smaller of a factor piece and its per-example gradients, for pieces kept until the end
    of backward (flat book-keeping, DESIGN §4): (left, right) hold B*T*(m+n) numbers, the
    per-example gradients B*m*n; convolutions with many output positions are the common case."""
    if not isinstance(piece, FactorPiece) or piece.batch_size == 0:
        return piece
    batch, seq, rows = piece.left.shape
    cols = piece.right.shape[2]
    if rows * cols >= seq * (rows + cols):
        return piece
    piece.path = "direct"
    return DensePiece(piece.param, piece.materialize())


def norm_sq(piece: Piece) -> torch.Tensor:
    """Per-example squared Frobenius norms ``(B,)`` (float32, float64 for float64 inputs)."""
    if piece.batch_size == 0:
        return torch.zeros(0, dtype=torch.float32, device=piece.param.device)
    if isinstance(piece, FactorPiece):
        _, seq, rows = piece.left.shape
        piece.path = kernels.choose_norm_path(seq_len=seq, rows=rows, cols=piece.right.shape[2])
        if piece.path == "ghost":
            return kernels.ghost_norm_sq(piece.left, piece.right)
        return kernels.direct_norm_sq(piece.left, piece.right)
    if isinstance(piece, OnehotPiece):
        return kernels.embedding_norm_sq(piece.ids, piece.grad, padding_idx=piece.padding_idx)
    grads = piece.grads.reshape(piece.batch_size, -1)
    return grads.to(_accum_dtype(grads)).pow(2).sum(dim=1)


def inner(p: Piece, q: Piece) -> torch.Tensor:
    """Per-example <G^p_i, G^q_i> of two pieces of the same parameter, ``(B,)``."""
    if p.batch_size != q.batch_size:
        raise ValueError(
            f"a parameter of shape {tuple(p.param.shape)} is used twice in one backward pass with "
            f"batch sizes {p.batch_size} and {q.batch_size}; per-example gradients of the two uses "
            "cannot be paired"
        )
    if p.batch_size == 0:
        return torch.zeros(0, dtype=torch.float32, device=p.param.device)
    if isinstance(q, OnehotPiece) and not isinstance(p, OnehotPiece):
        p, q = q, p
    if _disjoint_rows(p, q):
        return torch.zeros(p.batch_size, dtype=torch.float32, device=p.param.device)
    if _plain_factor(p) and _plain_factor(q):
        return kernels.ghost_inner(p.left, p.right, q.left, q.right)
    if isinstance(p, OnehotPiece) and _plain_factor(q):
        # Tied input embedding and LM head: <G_e, G_h> = sum_{t,s} left_s[ids_t] (grad_t . right_s).
        return kernels.embedding_dense_inner(
            p.ids, p.grad, q.left, q.right, padding_idx=p.padding_idx
        )
    if isinstance(p, OnehotPiece) and isinstance(q, OnehotPiece):
        return _onehot_inner(p, q)
    a, b = p.materialize(), q.materialize()
    dtype = _accum_dtype(a)
    return (a.reshape(a.shape[0], -1).to(dtype) * b.reshape(b.shape[0], -1).to(dtype)).sum(dim=1)


def _plain_factor(p: Piece) -> bool:
    return isinstance(p, FactorPiece) and p.rows is None


def _disjoint_rows(p: Piece, q: Piece) -> bool:
    if not (isinstance(p, FactorPiece) and isinstance(q, FactorPiece)):
        return False
    if p.rows is None or q.rows is None:
        return False
    return p.rows.stop <= q.rows.start or q.rows.stop <= p.rows.start


def _onehot_inner(p: OnehotPiece, q: OnehotPiece) -> torch.Tensor:
    same = p.ids.unsqueeze(2) == q.ids.unsqueeze(1)  # (B, T, S)
    if p.padding_idx is not None:
        same &= (p.ids != p.padding_idx).unsqueeze(2)
    dtype = _accum_dtype(p.grad)
    dots = torch.bmm(p.grad.to(dtype), q.grad.to(dtype).transpose(1, 2))  # (B, T, S)
    return (dots * same.to(dtype)).sum(dim=(1, 2))


def weighted_sum(piece: Piece, weights: torch.Tensor) -> torch.Tensor:
    """sum_i weights[i] * G_i in the parameter's shape (float32; float64 for float64 inputs)."""
    param = piece.param
    dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
    if piece.batch_size == 0:
        return torch.zeros(param.shape, dtype=dtype, device=param.device)
    if isinstance(piece, FactorPiece):
        matrix = kernels.clipped_weight_grad(piece.left, piece.right, weights)
        if piece.rows is None:
            return matrix.reshape(param.shape).to(dtype)
        full = torch.zeros(param.shape[0], param[0].numel(), dtype=dtype, device=param.device)
        full[piece.rows] = matrix.reshape(piece.rows.stop - piece.rows.start, -1).to(dtype)
        return full.reshape(param.shape)
    if isinstance(piece, OnehotPiece):
        return kernels.embedding_clipped_grad(
            piece.ids, piece.grad, weights,
            num_embeddings=param.shape[0], padding_idx=piece.padding_idx,
        ).to(dtype)
    grads = piece.grads.reshape(piece.batch_size, -1).to(dtype)
    return (weights.to(dtype) @ grads).reshape(param.shape)
