"""Per-example gradients in the form each layer rule hands over, and the operations done with them.

A layer's backward gives, for each trainable parameter it uses, one *piece*: a compact form of that
use's per-example gradients. Each piece form owns the operations the clipping code needs:

- ``piece.norm_sq()``: per-example squared norms ``(B,)``; also records ``piece.norm_path``, how
  they were computed (for ``dpfused.explain``);
- ``piece.inner(other)``: per-example inner products of two pieces of the SAME parameter (a
  parameter used more than once, e.g. tied embeddings: ||sum_u G^u||^2 = sum_{u,v} <G^u, G^v>,
  docs/design.md §3);
- ``piece.weighted_sum(w)``: sum_i w_i G_i, the clipped gradient, without materializing G_i;
- ``piece.compact()``: the smaller of the piece and its per-example gradients, for pieces kept
  until the end of backward (flat book-keeping).

Forms, the kernels (``dpfused.kernels``) each reaches, and its ``norm_path``:

- ``FactorPiece``: G_i = sum_t left[i,t] (x) right[i,t] viewed as (rows of) the parameter. Linear,
  Conv1D, unfolded convolutions and attention projections. ``choose_norm_path`` picks
  ``ghost_norm_sq`` ("ghost") or ``direct_norm_sq`` ("direct"); ``ghost_inner`` for cross terms;
  ``clipped_weight_grad`` for the clipped sum.
- ``OnehotPiece``: an embedding lookup, G_i = sum_t onehot(ids[i,t]) (x) grad[i,t].
  ``embedding_norm_sq`` ("embedding"), ``embedding_dense_inner`` (tied LM head),
  ``embedding_clipped_grad``.
- ``DensePiece``: the per-example gradients themselves ``(B, *param.shape)``; small parameters
  (norm layers, biases), the torch.func fallback ("dense"), and factor pieces that ``compact``
  materialized ("direct (materialized)"). Plain torch arithmetic, no kernel.

The module-level functions ``norm_sq``, ``inner``, ``weighted_sum`` and ``compact`` delegate to the
methods (kept for callers not yet switched to the methods).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dpfused import kernels

__all__ = ["FactorPiece", "OnehotPiece", "DensePiece", "Piece", "norm_sq", "inner", "weighted_sum",
           "compact", "NORM_PATHS"]

# Every value ``norm_path`` takes once ``norm_sq`` ran ("" before, and for an empty batch).
NORM_PATHS = ("ghost", "direct", "direct (materialized)", "embedding", "dense")


@dataclass
class FactorPiece:
    """G_i = sum_t left[i, t] (x) right[i, t], a (rows, cols) matrix placed in the parameter.

    Attributes:
        param: the parameter this gradient belongs to.
        left: ``(B, T, m)``; for nn.Linear the output gradient.
        right: ``(B, T, n)``; for nn.Linear the input activations.
        rows: where the (m, n) matrix sits in ``param`` viewed as ``(param.shape[0], -1)``; None for
            all of it. Used by grouped convolutions and cross-attention in_proj slices.
        norm_path: "ghost" or "direct", set by ``norm_sq`` (or "direct" by ``compact`` when it
            materializes the piece); "" before.
    """

    param: torch.nn.Parameter
    left: torch.Tensor
    right: torch.Tensor
    rows: slice | None = None
    norm_path: str = field(default="", init=False)

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

    def compact(self) -> FactorPiece | DensePiece:
        """This piece, or its per-example gradients when smaller (docs/design.md §4).

        (left, right) hold B*T*(m+n) numbers, the per-example gradients B*m*n; convolutions with
        many output positions are the common case for materializing.
        """
        if self.batch_size == 0:
            return self
        _, seq, rows = self.left.shape
        cols = self.right.shape[2]
        if rows * cols >= seq * (rows + cols):
            return self
        self.norm_path = "direct"
        return DensePiece(self.param, self.materialize(), materialized=True)

    def norm_sq(self) -> torch.Tensor:
        """Per-example squared Frobenius norms ``(B,)`` by the ghost or the direct kernel."""
        if self.batch_size == 0:
            return _empty_norms(self)
        _, seq, rows = self.left.shape
        self.norm_path = kernels.choose_norm_path(seq_len=seq, rows=rows, cols=self.right.shape[2])
        if self.norm_path == "ghost":
            return kernels.ghost_norm_sq(self.left, self.right)
        return kernels.direct_norm_sq(self.left, self.right)

    def inner(self, other: Piece) -> torch.Tensor:
        """Per-example <G^self_i, G^other_i> with another piece of the same parameter, ``(B,)``."""
        _check_pair(self, other)
        if self.batch_size == 0:
            return _empty_norms(self)
        if isinstance(other, OnehotPiece):
            return other.inner(self)
        if _disjoint_rows(self, other):
            return torch.zeros(self.batch_size, dtype=torch.float32, device=self.param.device)
        if _plain_factor(self) and _plain_factor(other):
            return kernels.ghost_inner(self.left, self.right, other.left, other.right)
        return _materialized_inner(self, other)

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """sum_i weights[i] * G_i in the parameter's shape (float32; float64 for float64 inputs)."""
        param = self.param
        dtype = _sum_dtype(param)
        if self.batch_size == 0:
            return torch.zeros(param.shape, dtype=dtype, device=param.device)
        matrix = kernels.clipped_weight_grad(self.left, self.right, weights)
        if self.rows is None:
            return matrix.reshape(param.shape).to(dtype)
        full = torch.zeros(param.shape[0], param[0].numel(), dtype=dtype, device=param.device)
        full[self.rows] = matrix.reshape(self.rows.stop - self.rows.start, -1).to(dtype)
        return full.reshape(param.shape)


@dataclass
class OnehotPiece:
    """An embedding use: G_i = sum_t onehot(ids[i, t]) (x) grad[i, t]; padding rows excluded.

    Attributes:
        norm_path: "embedding" once ``norm_sq`` ran; "" before.
    """

    param: torch.nn.Parameter
    ids: torch.Tensor  # (B, T) int64
    grad: torch.Tensor  # (B, T, D)
    padding_idx: int | None = None
    norm_path: str = field(default="", init=False)

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

    def compact(self) -> OnehotPiece:
        """Already the smaller form: (ids, grad) never exceed the per-example gradients' size."""
        return self

    def norm_sq(self) -> torch.Tensor:
        """Per-example squared norms ``(B,)`` by the embedding kernel (repeated ids summed)."""
        if self.batch_size == 0:
            return _empty_norms(self)
        self.norm_path = "embedding"
        return kernels.embedding_norm_sq(self.ids, self.grad, padding_idx=self.padding_idx)

    def inner(self, other: Piece) -> torch.Tensor:
        """Per-example <G^self_i, G^other_i> with another piece of the same parameter, ``(B,)``."""
        _check_pair(self, other)
        if self.batch_size == 0:
            return _empty_norms(self)
        if _plain_factor(other):
            # Tied input embedding and LM head: <G_e, G_h> = sum_{t,s} left_s[ids_t] (grad_t . right_s).
            return kernels.embedding_dense_inner(
                self.ids, self.grad, other.left, other.right, padding_idx=self.padding_idx
            )
        if isinstance(other, OnehotPiece):
            return self._onehot_inner(other)
        return _materialized_inner(self, other)

    def _onehot_inner(self, other: OnehotPiece) -> torch.Tensor:
        same = self.ids.unsqueeze(2) == other.ids.unsqueeze(1)  # (B, T, S)
        if self.padding_idx is not None:
            same &= (self.ids != self.padding_idx).unsqueeze(2)
        dtype = _accum_dtype(self.grad)
        dots = torch.bmm(self.grad.to(dtype), other.grad.to(dtype).transpose(1, 2))  # (B, T, S)
        return (dots * same.to(dtype)).sum(dim=(1, 2))

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """sum_i weights[i] * G_i in the parameter's shape (float32; float64 for float64 inputs)."""
        param = self.param
        dtype = _sum_dtype(param)
        if self.batch_size == 0:
            return torch.zeros(param.shape, dtype=dtype, device=param.device)
        return kernels.embedding_clipped_grad(
            self.ids, self.grad, weights,
            num_embeddings=param.shape[0], padding_idx=self.padding_idx,
        ).to(dtype)


@dataclass
class DensePiece:
    """Per-example gradients as they are: ``(B, *param.shape)``.

    Attributes:
        materialized: True when ``FactorPiece.compact`` built this piece from a factor piece.
        norm_path: "dense", or "direct (materialized)" for a materialized factor piece, once
            ``norm_sq`` ran; "" before.
    """

    param: torch.nn.Parameter
    grads: torch.Tensor
    materialized: bool = False
    norm_path: str = field(default="", init=False)

    @property
    def batch_size(self) -> int:
        return self.grads.shape[0]

    def materialize(self) -> torch.Tensor:
        return self.grads

    def compact(self) -> DensePiece:
        """Already per-example gradients: nothing smaller to turn into."""
        return self

    def norm_sq(self) -> torch.Tensor:
        """Per-example squared norms ``(B,)`` of the stored gradients (float64 for float64)."""
        if self.batch_size == 0:
            return _empty_norms(self)
        self.norm_path = "direct (materialized)" if self.materialized else "dense"
        grads = self.grads.reshape(self.batch_size, -1)
        return grads.to(_accum_dtype(grads)).pow(2).sum(dim=1)

    def inner(self, other: Piece) -> torch.Tensor:
        """Per-example <G^self_i, G^other_i> with another piece of the same parameter, ``(B,)``."""
        _check_pair(self, other)
        if self.batch_size == 0:
            return _empty_norms(self)
        if isinstance(other, OnehotPiece):
            return other.inner(self)
        return _materialized_inner(self, other)

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """sum_i weights[i] * G_i in the parameter's shape (float32; float64 for float64 inputs)."""
        param = self.param
        dtype = _sum_dtype(param)
        if self.batch_size == 0:
            return torch.zeros(param.shape, dtype=dtype, device=param.device)
        grads = self.grads.reshape(self.batch_size, -1).to(dtype)
        return (weights.to(dtype) @ grads).reshape(param.shape)


Piece = FactorPiece | OnehotPiece | DensePiece


def _accum_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _sum_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _empty_norms(piece: Piece) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.float32, device=piece.param.device)


def _place_rows(per_example: torch.Tensor, param: torch.Tensor, rows: slice | None) -> torch.Tensor:
    batch = per_example.shape[0]
    if rows is None:
        return per_example.reshape(batch, *param.shape)
    full = per_example.new_zeros(batch, param.shape[0], param[0].numel())
    full[:, rows] = per_example.reshape(batch, rows.stop - rows.start, -1)
    return full.reshape(batch, *param.shape)


def _check_pair(p: Piece, q: Piece) -> None:
    if p.batch_size != q.batch_size:
        raise ValueError(
            f"a parameter of shape {tuple(p.param.shape)} is used twice in one backward pass with "
            f"batch sizes {p.batch_size} and {q.batch_size}; per-example gradients of the two uses "
            "cannot be paired"
        )


def _plain_factor(p: Piece) -> bool:
    return isinstance(p, FactorPiece) and p.rows is None


def _disjoint_rows(p: Piece, q: Piece) -> bool:
    if not (isinstance(p, FactorPiece) and isinstance(q, FactorPiece)):
        return False
    if p.rows is None or q.rows is None:
        return False
    return p.rows.stop <= q.rows.start or q.rows.stop <= p.rows.start


def _materialized_inner(p: Piece, q: Piece) -> torch.Tensor:
    """The general case: both pieces' per-example gradients, multiplied elementwise and summed."""
    a, b = p.materialize(), q.materialize()
    dtype = _accum_dtype(a)
    return (a.reshape(a.shape[0], -1).to(dtype) * b.reshape(b.shape[0], -1).to(dtype)).sum(dim=1)
