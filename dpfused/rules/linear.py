"""Linear-type layers: nn.Linear (any input rank) and HuggingFace Conv1D (transposed weight).

Pieces: weight -> ``FactorPiece`` (left = output gradient, right = input; swapped for Conv1D);
bias -> ``DensePiece``. Kernels reached: ``kernels.choose_norm_path`` then ``ghost_norm_sq`` or
``direct_norm_sq`` (norm_path "ghost" / "direct"), ``ghost_inner`` for a shared weight,
``clipped_weight_grad`` for the clipped sum; kept to the end of backward (flat) a small factor
piece is materialized (``FactorPiece.compact``, norm_path "direct (materialized)").

y = x W^T + b. Example i's weight gradient is G_i = sum_t g_{i,t} a_{i,t}^T: a FactorPiece with
left = g (B, T, d_out) and right = a (B, T, d_in). Conv1D stores W as (d_in, d_out), so there
G_i = sum_t a_{i,t} g_{i,t}^T and the factors swap. The bias gradient sum_t g_{i,t} is a small
dense piece. ``linear_use`` is also the building block of the attention rule.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpfused.pieces import DensePiece, FactorPiece
from dpfused.rules import BaseRule, register
from dpfused.rules._shape import as_sequence, batch_major


class _LinearFunction(torch.autograd.Function):
    """Linear map whose backward delivers per-example pieces instead of a weight gradient.

    The parameters are inputs so that autograd reaches this node even when ``x`` needs no
    gradient; their gradients are returned as None, so autograd never forms the batch-summed
    (unclipped) weight gradient. Parameters are leaves: keeping them on ctx makes no graph cycle.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, tap, input_major, rows):
        ctx.save_for_backward(x)
        ctx.weight, ctx.bias, ctx.tap, ctx.input_major, ctx.rows = weight, bias, tap, input_major, rows
        return F.linear(x, _matrix(weight, input_major, rows), _bias_rows(bias, rows))

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(_matrix(ctx.weight, ctx.input_major, ctx.rows).to(grad_out.dtype))
        ctx.tap.deliver(_pieces(x, grad_out, ctx.weight, ctx.bias, ctx.tap.batch_first,
                                ctx.input_major, ctx.rows))
        return grad_x, None, None, None, None, None


def _matrix(weight, input_major, rows):
    matrix = weight.t() if input_major else weight  # (d_out, d_in)
    return matrix if rows is None else matrix[rows]


def _bias_rows(bias, rows):
    return bias if bias is None or rows is None else bias[rows]


def _pieces(x, grad_out, weight, bias, batch_first, input_major, rows):
    a = as_sequence(x, batch_first)  # (B, T, d_in)
    g = as_sequence(grad_out, batch_first)  # (B, T, d_out)
    pieces = []
    if weight.requires_grad:
        left, right = (a, g) if input_major else (g, a)
        pieces.append(FactorPiece(weight, left=left, right=right, rows=rows))
    if bias is not None and bias.requires_grad:
        bias_grads = g.sum(dim=1)  # (B, d_out)
        if rows is not None:
            full = bias_grads.new_zeros(bias_grads.shape[0], bias.shape[0])
            full[:, rows] = bias_grads
            bias_grads = full
        pieces.append(DensePiece(bias, bias_grads))
    return pieces


def linear_use(x, weight, bias, *, tap, input_major=False, rows=None):
    """y = x W^T + b (x W + b for ``input_major``), using rows ``rows`` of W^T only, DP backward.

    ``bias`` may be None. Parameters that do not require grad get no piece (frozen LoRA bases).
    """
    tap.record_forward(batch_major(x, tap.batch_first).shape[0] if x.dim() >= 2 else None)
    return _LinearFunction.apply(x, weight, bias, tap, input_major, rows)


@register(nn.Linear)
class LinearRule(BaseRule):
    name = "linear"
    def forward(self, module, tap, x):
        return linear_use(x, module.weight, module.bias, tap=tap)


@register("transformers.pytorch_utils.Conv1D")
class HFConv1DRule(BaseRule):
    name = "conv1d_hf"
    def forward(self, module, tap, x):
        return linear_use(x, module.weight, module.bias, tap=tap, input_major=True)
