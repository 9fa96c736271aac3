"""Per-example gradients in the form each layer rule hands over, and the operations done with them.

A layer's backward gives, for each trainable parameter it uses, one *piece*: a compact form of that
use's per-example gradients. Each piece form owns the operations the clipping code needs:

- ``piece.norm_estimate()``: per-example squared norms with a rigorous bound on their floating-point
  error (``kernels.Estimate``); also records ``piece.norm_path``, how they were computed (for
  ``dpfused.explain``). ``piece.norm_sq()`` is its value alone.
- ``piece.inner_estimate(other)``: per-example inner products of two pieces of the SAME parameter (a
  parameter used more than once, e.g. tied embeddings: ||sum_u G^u||^2 = sum_{u,v} <G^u, G^v>,
  docs/design.md §3), with its error bound; ``piece.inner(other)`` its value.
- ``piece.magnitude()``: an upper bound of each example's released gradient norm computed from
  positive quantities only, finite for every finite input (the fallback of
  ``privacy_math.norm_upper_bound``);
- ``piece.release_error()``: how far the per-example gradient that ``weighted_sum`` releases can be
  from the one ``norm_estimate`` measured (each example reduced on its own: docs/design.md §3);
- ``piece.weighted_sum(w)``: sum_i w_i G_i, the clipped gradient, each example reduced before the
  examples are added (in float64), without materializing G_i;
- ``piece.materialize(examples, pow2)``: per-example gradients of a slice of examples, each scaled by
  a power of two (exact), for the clipped sum of a parameter used by pieces of different forms;
- ``piece.compact()``: the smaller of the piece and its per-example gradients, for pieces kept
  until the end of backward (flat book-keeping).

Forms, the kernels (``dpfused.kernels``) each reaches, and its ``norm_path``:

- ``FactorPiece``: G_i = sum_t left[i,t] (x) right[i,t] viewed as (rows of) the parameter. Linear,
  Conv1D, unfolded convolutions and attention projections. ``choose_norm_path`` picks
  ``ghost_norm_sq_bounded`` ("ghost") or ``direct_norm_sq_bounded`` ("direct");
  ``ghost_inner_bounded`` for cross terms; ``clipped_weight_grad`` for the clipped sum.
- ``OnehotPiece``: an embedding lookup, G_i = sum_t onehot(ids[i,t]) (x) grad[i,t]. Its rows are
  summed per (example, id) once (``embedding_groups``, float64) and norms and clipped sums both come
  from those sums ("embedding"); ``embedding_dense_inner_bounded`` for a tied LM head.
- ``DensePiece``: the per-example gradients themselves ``(B, *param.shape)``; small parameters
  (norm layers, biases), the torch.func fallback ("dense"), and factor pieces that ``compact``
  materialized ("direct (materialized)"). Norms and sums from the same tensor, in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dpfused import kernels
from dpfused.kernels import Estimate

__all__ = ["FactorPiece", "OnehotPiece", "DensePiece", "Piece", "NORM_PATHS", "disjoint",
           "joint_release_error", "joint_weighted_sum", "merge_factor_uses"]

# Every value ``norm_path`` takes once ``norm_sq`` ran ("" before, and for an empty batch).
NORM_PATHS = ("ghost", "direct", "direct (materialized)", "embedding", "dense")

# A factor piece is materialized by ``compact`` only when its entries cannot overflow float32:
# every entry (and partial sum) of G_i is at most T max|left| max|right|.
_MATERIALIZE_LIMIT = 1e30
_CHUNK_ELEMENTS = 1 << 24  # per-example gradients held at once by the chunked operations


@dataclass
class FactorPiece:
    """G_i = sum_t left[i, t] (x) right[i, t], a (rows, cols) matrix placed in the parameter.

    Attributes:
        param: the parameter this gradient belongs to.
        left: ``(B, T, m)``; for nn.Linear the output gradient.
        right: ``(B, T, n)``; for nn.Linear the input activations.
        rows: where the (m, n) matrix sits in ``param`` viewed as ``(param.shape[0], -1)``; None for
            all of it. Used by grouped convolutions and cross-attention in_proj slices.
        norm_path: "ghost" or "direct", set by ``norm_estimate`` (or "direct" by ``compact`` when
            it materializes the piece); "" before.
    """

    param: torch.nn.Parameter
    left: torch.Tensor
    right: torch.Tensor
    rows: slice | None = None
    norm_path: str = field(default="", init=False)
    # The factor pieces ``merge_factor_uses`` joined into this one (their norm_path follows it).
    sources: tuple = field(default=(), repr=False)
    _norms: kernels.FactorNorms | None = field(default=None, init=False, repr=False)

    @property
    def norms(self) -> kernels.FactorNorms:
        """The row norms of left and right (float64), computed once."""
        if self._norms is None:
            self._norms = kernels.factor_norms(self.left, self.right)
        return self._norms

    @property
    def batch_size(self) -> int:
        return self.left.shape[0]

    def materialize(self, examples: slice = slice(None), pow2: torch.Tensor | None = None):
        """Per-example gradients ``(b, *param.shape)`` of ``examples`` in the accumulation dtype,
        example i's left rows scaled by ``pow2[i]`` first (a power of two: exact)."""
        # Under autocast the saved input may be float32 next to a bf16 output gradient: take at
        # least float32, the accumulation dtype of every sum here.
        dtype = _accum_dtype(self.left, self.right)
        left = self.left[examples].to(dtype)
        if pow2 is not None:
            left = left * pow2.to(dtype).view(-1, 1, 1)
        with kernels.exact_fp32_matmul():
            per_example = torch.bmm(left.transpose(1, 2), self.right[examples].to(dtype))
        return _place_rows(per_example, self.param, self.rows)

    def compact(self) -> FactorPiece | DensePiece:
        """This piece, or its per-example gradients when smaller (docs/design.md §4).

        (left, right) hold B*T*(m+n) numbers, the per-example gradients B*m*n; convolutions with
        many output positions are the common case for materializing. An example large enough to
        overflow float32 once materialized keeps the factor form.
        """
        if self.batch_size == 0:
            return self
        _, seq, rows = self.left.shape
        cols = self.right.shape[2]
        if rows * cols >= seq * (rows + cols) or not self._fits_float32():
            return self
        self.norm_path = "direct"
        return DensePiece(self.param, self.materialize(), materialized=True)

    def _fits_float32(self) -> bool:
        """Every entry (and partial sum) of every G_i is below the limit: T max|left| max|right|."""
        seq = self.left.shape[1]
        largest = float(self.left.abs().amax()) * float(self.right.abs().amax())
        return seq * largest < _MATERIALIZE_LIMIT

    def norm_estimate(self) -> Estimate:
        """Per-example squared Frobenius norms by the ghost or the direct kernel, with error."""
        if self.batch_size == 0:
            return _empty_estimate(self)
        _, seq, rows = self.left.shape
        self.norm_path = kernels.choose_norm_path(seq_len=seq, rows=rows, cols=self.right.shape[2])
        for source in self.sources:
            source.norm_path = self.norm_path
        if self.norm_path == "ghost":
            return kernels.ghost_norm_sq_bounded(self.left, self.right, norms=self.norms)
        return kernels.direct_norm_sq_bounded(self.left, self.right, norms=self.norms)

    def norm_sq(self) -> torch.Tensor:
        return _value(self.norm_estimate(), self)

    def magnitude(self) -> torch.Tensor:
        """K_i (1 + gamma_T): bounds ||G_i|| and the released ||G~_i|| (module docstring)."""
        if self.batch_size == 0:
            return _empty_bound(self)
        return self.norms.magnitude * (1 + self._release_gamma())

    def release_error(self) -> torch.Tensor:
        """||G~_i - G_i|| <= gamma_T K_i: G~_i reduced over its own T rows (clipped_weight_grad)."""
        if self.batch_size == 0:
            return _empty_bound(self)
        return self.norms.magnitude * self._release_gamma()

    def _release_gamma(self) -> float:
        """The T-term reduction's gamma, plus float64 rounding of K itself (its T products of
        norms of m- and n-vectors)."""
        seq, rows, cols = self.left.shape[1], self.left.shape[2], self.right.shape[2]
        return (kernels.gamma(seq + 2, _accum_dtype(self.left, self.right))
                + kernels.gamma(seq + rows + cols + 2, torch.float64))

    def inner_estimate(self, other: Piece) -> Estimate:
        """Per-example <G^self_i, G^other_i> with another piece of the same parameter, with error."""
        _check_pair(self, other)
        if self.batch_size == 0:
            return _empty_estimate(self)
        if isinstance(other, OnehotPiece):
            return other.inner_estimate(self)
        if _disjoint_rows(self, other):
            zeros = torch.zeros(self.batch_size, dtype=torch.float64, device=self.left.device)
            return Estimate(zeros, zeros)
        if _plain_factor(self) and _plain_factor(other):
            return kernels.ghost_inner_bounded(self.left, self.right, other.left, other.right,
                                               norms1=self.norms, norms2=other.norms)
        return _materialized_inner(self, other)

    def inner(self, other: Piece) -> torch.Tensor:
        return _value(self.inner_estimate(other), self)

    def materialize_error(self) -> torch.Tensor:
        """||materialize() - G_i||: a T-term sum per entry."""
        return self.release_error()

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """sum_i weights[i] * G_i in the parameter's shape (float32; float64 for float64 inputs)."""
        param = self.param
        dtype = _sum_dtype(param)
        if self.batch_size == 0:
            return torch.zeros(param.shape, dtype=dtype, device=param.device)
        matrix = kernels.clipped_weight_grad(self.left, self.right, weights)
        if self.rows is None:
            return matrix.reshape(param.shape).to(dtype)
        # The shape only: under FSDP2 the unsharded parameter's storage may be freed by now.
        full = torch.zeros(param.shape[0], param.shape[1:].numel(), dtype=dtype,
                           device=param.device)
        full[self.rows] = matrix.reshape(self.rows.stop - self.rows.start, -1).to(dtype)
        return full.reshape(param.shape)


@dataclass
class OnehotPiece:
    """An embedding use: G_i = sum_t onehot(ids[i, t]) (x) grad[i, t]; padding rows excluded.

    The per-(example, id) sums of ``grad`` are formed once, in float64, and both the norms and the
    clipped sum come from them, so the norm is exactly that of what is released.

    Attributes:
        norm_path: "embedding" once ``norm_estimate`` ran; "" before.
    """

    param: torch.nn.Parameter
    ids: torch.Tensor  # (B, T) int64
    grad: torch.Tensor  # (B, T, D)
    padding_idx: int | None = None
    norm_path: str = field(default="", init=False)
    _groups: kernels.EmbeddingGroups | None = field(default=None, init=False, repr=False)

    @property
    def batch_size(self) -> int:
        return self.ids.shape[0]

    @property
    def groups(self) -> kernels.EmbeddingGroups:
        """The example's rows summed per id (``kernels.embedding_groups``), computed once."""
        if self._groups is None:
            self._groups = kernels.embedding_groups(self.ids, self.grad,
                                                    padding_idx=self.padding_idx)
        return self._groups

    def materialize(self, examples: slice = slice(None), pow2: torch.Tensor | None = None):
        """Per-example gradients ``(b, V, D)`` of ``examples`` in the accumulation dtype."""
        first, stop, _ = examples.indices(self.batch_size)
        out = torch.zeros(stop - first, self.param.shape[0], self.grad.shape[2],
                          dtype=_accum_dtype(self.grad), device=self.grad.device)
        self.add_rows_into(out, examples, pow2)
        return out

    def add_rows_into(self, total: torch.Tensor, examples: slice,
                      pow2: torch.Tensor | None = None) -> None:
        """``total[i] += G_i`` for ``examples`` (``total``: ``(b, V, D)``; rows pre-scaled by
        ``pow2`` if given), touching only the rows the examples hold: the float64 rows rounded
        to ``total``'s dtype, then one addition (exact into zeros)."""
        first, stop, _ = examples.indices(self.batch_size)
        groups = self.groups
        chosen = (groups.example >= first) & (groups.example < stop)
        rows = groups.sums[chosen]
        if pow2 is not None:
            rows = rows * pow2.double()[groups.example[chosen] - first].unsqueeze(1)
        total.index_put_((groups.example[chosen] - first, groups.ids[chosen]),
                         rows.to(total.dtype), accumulate=True)

    def compact(self) -> OnehotPiece:
        """Already the smaller form: (ids, grad) never exceed the per-example gradients' size."""
        return self

    def norm_estimate(self) -> Estimate:
        """Per-example squared norms of the grouped rows, in float64."""
        if self.batch_size == 0:
            return _empty_estimate(self)
        self.norm_path = "embedding"
        value = kernels.groups_norm_sq(self.groups, self.batch_size)
        return Estimate(value, value * kernels.gamma(self.grad.shape[2] + 1, torch.float64))

    def norm_sq(self) -> torch.Tensor:
        return _value(self.norm_estimate(), self)

    def magnitude(self) -> torch.Tensor:
        """The norm of the grouped rows (what is released), rounded up."""
        if self.batch_size == 0:
            return _empty_bound(self)
        return _rounded_up_norm(kernels.groups_norm_sq(self.groups, self.batch_size),
                                self.grad.shape[2] + 1)

    def release_error(self) -> torch.Tensor:
        """0: the clipped sum releases the very rows whose norm was taken."""
        return torch.zeros(self.batch_size, dtype=torch.float64, device=self.grad.device)

    def materialize_error(self) -> torch.Tensor:
        """``materialize`` rounds the float64 rows to the accumulation dtype once."""
        return self.magnitude() * kernels.gamma(1, _accum_dtype(self.grad))

    def inner_estimate(self, other: Piece) -> Estimate:
        """Per-example <G^self_i, G^other_i> with another piece of the same parameter, with error."""
        _check_pair(self, other)
        if self.batch_size == 0:
            return _empty_estimate(self)
        if _plain_factor(other):
            # Tied input embedding and LM head: <G_e, G_h> = sum_{t,s} left_s[ids_t] (grad_t . right_s).
            return kernels.embedding_dense_inner_bounded(
                self.ids, self.grad, other.left, other.right, padding_idx=self.padding_idx)
        if isinstance(other, OnehotPiece):
            return self._onehot_inner(other)
        return _materialized_inner(self, other)

    def inner(self, other: Piece) -> torch.Tensor:
        return _value(self.inner_estimate(other), self)

    def _onehot_inner(self, other: OnehotPiece) -> Estimate:
        """Two embedding uses: sum over the (example, id) groups both hold of h_v . h'_v, float64."""
        mine, theirs = self.groups, other.groups
        vocabulary = self.param.shape[0]
        keys = mine.example * vocabulary + mine.ids
        other_keys = other.groups.example * vocabulary + other.groups.ids
        position = torch.searchsorted(other_keys, keys).clamp(max=max(len(other_keys) - 1, 0))
        shared = other_keys[position] == keys if len(other_keys) else torch.zeros_like(keys, dtype=torch.bool)
        dots = (mine.sums[shared] * theirs.sums[position[shared]]).sum(dim=1)
        value = torch.zeros(self.batch_size, dtype=torch.float64, device=dots.device)
        value.index_add_(0, mine.example[shared], dots)
        bound = self.magnitude() * other.magnitude()
        return Estimate(value, bound * kernels.gamma(self.grad.shape[2] + 1, torch.float64))

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """sum_i weights[i] * G_i in the parameter's shape (float32; float64 for float64 inputs)."""
        param = self.param
        dtype = _sum_dtype(param)
        if self.batch_size == 0:
            return torch.zeros(param.shape, dtype=dtype, device=param.device)
        return kernels.groups_clipped_grad(self.groups, weights, param.shape[0]).to(dtype)


@dataclass
class DensePiece:
    """Per-example gradients as they are: ``(B, *param.shape)``.

    Attributes:
        materialized: True when ``FactorPiece.compact`` built this piece from a factor piece.
        norm_path: "dense", or "direct (materialized)" for a materialized factor piece, once
            ``norm_estimate`` ran; "" before.
    """

    param: torch.nn.Parameter
    grads: torch.Tensor
    materialized: bool = False
    norm_path: str = field(default="", init=False)

    @property
    def batch_size(self) -> int:
        return self.grads.shape[0]

    def materialize(self, examples: slice = slice(None), pow2: torch.Tensor | None = None):
        grads = self.grads[examples].to(_accum_dtype(self.grads))
        if pow2 is None:
            return grads
        return grads * pow2.to(grads.dtype).view(-1, *([1] * (grads.dim() - 1)))

    def compact(self) -> DensePiece:
        """Already per-example gradients: nothing smaller to turn into."""
        return self

    def _flat_norm_sq(self) -> torch.Tensor:
        return self.grads.reshape(self.batch_size, -1).double().pow(2).sum(dim=1)

    def norm_estimate(self) -> Estimate:
        """Per-example squared norms of the stored gradients, in float64."""
        if self.batch_size == 0:
            return _empty_estimate(self)
        self.norm_path = "direct (materialized)" if self.materialized else "dense"
        value = self._flat_norm_sq()
        return Estimate(value, value * kernels.gamma(self._numel() + 1, torch.float64))

    def norm_sq(self) -> torch.Tensor:
        return _value(self.norm_estimate(), self)

    def _numel(self) -> int:
        return self.grads[0].numel() if self.batch_size else 0

    def magnitude(self) -> torch.Tensor:
        if self.batch_size == 0:
            return _empty_bound(self)
        return _rounded_up_norm(self._flat_norm_sq(), self._numel() + 1)

    def release_error(self) -> torch.Tensor:
        """0: the clipped sum releases the stored gradients themselves."""
        return torch.zeros(self.batch_size, dtype=torch.float64, device=self.grads.device)

    def materialize_error(self) -> torch.Tensor:
        return self.magnitude() * kernels.gamma(1, _accum_dtype(self.grads))

    def inner_estimate(self, other: Piece) -> Estimate:
        """Per-example <G^self_i, G^other_i> with another piece of the same parameter, with error."""
        _check_pair(self, other)
        if self.batch_size == 0:
            return _empty_estimate(self)
        if isinstance(other, OnehotPiece):
            return other.inner_estimate(self)
        return _materialized_inner(self, other)

    def inner(self, other: Piece) -> torch.Tensor:
        return _value(self.inner_estimate(other), self)

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """sum_i weights[i] * G_i in the parameter's shape (float32; float64 for float64 inputs):
        the examples added in float64."""
        param = self.param
        dtype = _sum_dtype(param)
        if self.batch_size == 0:
            return torch.zeros(param.shape, dtype=dtype, device=param.device)
        out = torch.zeros(param.numel(), dtype=torch.float64, device=self.grads.device)
        chunk = max(1, _CHUNK_ELEMENTS // max(1, self._numel()))
        for start in range(0, self.batch_size, chunk):
            sl = slice(start, start + chunk)
            kernels.add_examples_float64(out, self.grads[sl], weights[sl])
        return out.reshape(param.shape).to(dtype)


Piece = FactorPiece | OnehotPiece | DensePiece


def merge_factor_uses(pieces: list[Piece]) -> list[Piece]:
    """Pieces of ONE parameter with every plain factor use joined into one factor piece.

    Two factor uses of a weight (a layer called twice, weight sharing) are one factor piece over
    their tokens concatenated: sum_t over both is the example's summed gradient, so its norm holds
    the cross terms and its clipped sum reduces both uses of an example together, before examples
    are added (docs/design.md §3). Other pieces are returned as they are.
    """
    plain = [p for p in pieces if _plain_factor(p) and p.batch_size > 0]
    if len(plain) < 2:
        return pieces
    dtype = plain[0].left.dtype
    for p in plain:
        dtype = torch.promote_types(dtype, torch.promote_types(p.left.dtype, p.right.dtype))
    joined = FactorPiece(plain[0].param,
                         left=torch.cat([p.left.to(dtype) for p in plain], dim=1),
                         right=torch.cat([p.right.to(dtype) for p in plain], dim=1),
                         sources=tuple(plain))
    return [joined] + [p for p in pieces if not any(p is q for q in plain)]


def joint_weighted_sum(pieces: list[Piece], weights: torch.Tensor) -> torch.Tensor:
    """sum_i weights[i] * (sum_u G^u_i) for several pieces of one parameter: each example's uses
    added first, then the examples in float64 (docs/design.md §3). Per-example gradients are held
    a few examples at a time."""
    param = pieces[0].param
    batch = pieces[0].batch_size
    out = torch.zeros(param.shape, dtype=torch.float64, device=weights.device)
    pow2, rest = kernels.split_scale(weights)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, param.numel()))
    for start in range(0, batch, chunk):
        sl = slice(start, start + chunk)
        kernels.add_examples_float64(out, _uses_added(pieces, sl, pow2[sl]), rest[sl])
    return out.to(_sum_dtype(param))


def _uses_added(pieces: list[Piece], examples: slice, pow2: torch.Tensor) -> torch.Tensor:
    """sum_u G^u_i of ``examples`` (rows pre-scaled by ``pow2``), in the widest accumulation
    dtype of the pieces: the first piece materialized, each other added into it in place (one
    rounding per use, ``joint_release_error``); an embedding use adds only its (example, id) rows."""
    dtype = _accum_dtype(*[_any_tensor(p) for p in pieces])
    pieces = sorted(pieces, key=lambda p: isinstance(p, OnehotPiece))  # a dense one first
    total = pieces[0].materialize(examples, pow2).to(dtype)
    for piece in pieces[1:]:
        if isinstance(piece, OnehotPiece):
            piece.add_rows_into(total, examples, pow2)
        else:
            total += piece.materialize(examples, pow2)
    return total


def joint_release_error(pieces: list[Piece]) -> torch.Tensor:
    """How far ``joint_weighted_sum``'s per-example gradient is from sum_u G^u_i: each piece's
    materialization, and the additions of the uses (one rounding each, relative to the magnitudes)."""
    extra = kernels.gamma(len(pieces), _accum_dtype(*[_any_tensor(p) for p in pieces]))
    return sum(p.materialize_error() + extra * p.magnitude() for p in pieces)


def _any_tensor(piece: Piece) -> torch.Tensor:
    return piece.left if isinstance(piece, FactorPiece) else (
        piece.grad if isinstance(piece, OnehotPiece) else piece.grads)


def _value(estimate: Estimate, piece: Piece) -> torch.Tensor:
    return estimate.value.to(_accum_dtype(_any_tensor(piece)))


def _accum_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _sum_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _empty_bound(piece: Piece) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.float64, device=piece.param.device)


def _empty_estimate(piece: Piece) -> Estimate:
    return Estimate(_empty_bound(piece), _empty_bound(piece))


def _rounded_up_norm(norm_sq: torch.Tensor, terms: int) -> torch.Tensor:
    """sqrt of a float64 sum of ``terms`` squares, rounded up past its own rounding."""
    return norm_sq.sqrt() * (1 + kernels.gamma(terms + 1, torch.float64))


def _place_rows(per_example: torch.Tensor, param: torch.Tensor, rows: slice | None) -> torch.Tensor:
    batch = per_example.shape[0]
    if rows is None:
        return per_example.reshape(batch, *param.shape)
    full = per_example.new_zeros(batch, param.shape[0], param.shape[1:].numel())
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


def disjoint(pieces: list[Piece]) -> bool:
    """True when the pieces sit on pairwise disjoint rows of their parameter: their clipped sums
    then touch disjoint coordinates and may be formed one piece at a time."""
    return all(_disjoint_rows(p, q) for i, p in enumerate(pieces) for q in pieces[i + 1:])


def _materialized_inner(p: Piece, q: Piece) -> Estimate:
    """The general case: both pieces' per-example gradients, multiplied elementwise and summed in
    float64; off by at most each one's materialization error times the other's magnitude."""
    out = torch.zeros(p.batch_size, dtype=torch.float64, device=p.param.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, p.param.numel()))
    for start in range(0, p.batch_size, chunk):
        sl = slice(start, start + chunk)
        a, b = p.materialize(sl), q.materialize(sl)
        out[sl] = (a.reshape(a.shape[0], -1).double() * b.reshape(b.shape[0], -1).double()).sum(1)
    error = (p.materialize_error() * q.magnitude() + p.magnitude() * q.materialize_error()
             + p.magnitude() * q.magnitude() * kernels.gamma(p.param.numel() + 1, torch.float64))
    return Estimate(out, error)
