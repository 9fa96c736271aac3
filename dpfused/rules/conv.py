"""nn.Conv1d/2d/3d, unfolded to the linear form (docs/design.md §3).

Pieces: weight -> one ``FactorPiece`` per group (left = output gradient, right = unfolded input);
bias -> ``DensePiece``. Kernels reached: ``kernels.choose_norm_path`` then ``ghost_norm_sq`` or
``direct_norm_sq`` (norm_path "ghost" / "direct"), ``clipped_weight_grad``; in flat book-keeping
a factor piece smaller as per-example gradients (many output positions) is materialized
(``FactorPiece.compact``, norm_path "direct (materialized)").

T = output positions, d_in = (C_in / groups) * kernel volume. With groups > 1 the weight is block
diagonal: one FactorPiece per group, each on its own rows of the weight (no cross terms).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpfused.pieces import DensePiece, FactorPiece
from dpfused.rules import BaseRule, register

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_INPUT_GRAD = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input,
               3: torch.nn.grad.conv3d_input}


class _ConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, tap, module):
        padded = _pad(x, module)
        ctx.save_for_backward(padded)
        ctx.weight, ctx.bias, ctx.tap, ctx.module = weight, bias, tap, module
        ctx.x_shape = x.shape
        return _CONV[_dims(module)](padded, weight, bias, module.stride, 0, module.dilation,
                                    module.groups)

    @staticmethod
    def backward(ctx, grad_out):
        (padded,) = ctx.saved_tensors
        module = ctx.module
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_padded = _INPUT_GRAD[_dims(module)](
                padded.shape, ctx.weight.to(grad_out.dtype), grad_out, module.stride, 0,
                module.dilation, module.groups,
            )
            grad_x = _unpad(grad_padded, module, ctx.x_shape)
        ctx.tap.deliver(_pieces(padded, grad_out, ctx.weight, ctx.bias, module))
        return grad_x, None, None, None, None


def _dims(module):
    return len(module.kernel_size)


def _pad(x, module):
    """Apply the module's padding up front so that unfolding and the conv both use padding 0."""
    pads = module._reversed_padding_repeated_twice
    if not any(pads):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pads, mode=mode)


def _unpad(grad_padded, module, x_shape):
    pads = module._reversed_padding_repeated_twice
    if not any(pads):
        return grad_padded
    if module.padding_mode != "zeros":
        # Reflect/replicate/circular padding copies input values: fold their gradients back.
        x = torch.zeros(x_shape, dtype=grad_padded.dtype, device=grad_padded.device,
                        requires_grad=True)
        with torch.enable_grad():
            padded = F.pad(x, pads, mode=module.padding_mode)
            (grad_x,) = torch.autograd.grad(padded, x, grad_padded)
        return grad_x
    index = [slice(None), slice(None)]
    spatial = grad_padded.shape[2:]
    for d in range(len(spatial)):
        before, after = pads[2 * (len(spatial) - 1 - d)], pads[2 * (len(spatial) - 1 - d) + 1]
        index.append(slice(before, spatial[d] - after))
    return grad_padded[tuple(index)]


def _unfold(x, module):
    """(B, L, C_in * kernel volume), channel-major columns matching weight.view(C_out, -1)."""
    dims = _dims(module)
    if dims == 2:
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
        return cols.transpose(1, 2)
    if dims == 1:
        cols = F.unfold(x.unsqueeze(2), (1, module.kernel_size[0]),
                        dilation=(1, module.dilation[0]), stride=(1, module.stride[0]))
        return cols.transpose(1, 2)
    patches = x
    for d in range(3):  # (B, C, oD, oH, oW, kD, kH, kW) via strided windows
        span = module.dilation[d] * (module.kernel_size[d] - 1) + 1
        patches = patches.unfold(2 + d, span, module.stride[d])
        patches = patches[..., :: module.dilation[d]]
    batch, channels = x.shape[:2]
    patches = patches.permute(0, 2, 3, 4, 1, 5, 6, 7)  # (B, oD, oH, oW, C, kD, kH, kW)
    positions = math.prod(patches.shape[1:4])
    return patches.reshape(batch, positions, channels * math.prod(module.kernel_size))


def _pieces(padded, grad_out, weight, bias, module):
    batch, out_channels = grad_out.shape[:2]
    positions = math.prod(grad_out.shape[2:])  # explicit: -1 is ambiguous for an empty batch
    g = grad_out.reshape(batch, out_channels, positions).transpose(1, 2)  # (B, L, C_out)
    pieces = []
    if weight.requires_grad:
        a = _unfold(padded, module)  # (B, L, C_in * k)
        groups = module.groups
        rows_per, cols_per = out_channels // groups, a.shape[2] // groups
        for j in range(groups):
            rows = slice(j * rows_per, (j + 1) * rows_per)
            left = g[:, :, rows]
            right = a[:, :, j * cols_per:(j + 1) * cols_per]
            pieces.append(FactorPiece(weight, left=left, right=right,
                                      rows=None if groups == 1 else rows))
    if bias is not None and bias.requires_grad:
        pieces.append(DensePiece(bias, g.sum(dim=1)))
    return pieces


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(BaseRule):
    name = "conv"
    def check(self, module, path):
        if module.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"module '{path}': unknown padding_mode {module.padding_mode!r}")

    def forward(self, module, tap, x):
        if x.dim() == len(module.kernel_size) + 1:
            raise ValueError(
                f"{type(module).__name__} got an unbatched input of shape {tuple(x.shape)}; "
                "dpfused needs a batch dimension"
            )
        tap.record_forward()
        return _ConvFunction.apply(x, module.weight, module.bias, tap, module)
