"""Recurrent layers, dpfused's (DPLSTM, DPGRU, DPRNN) and torch's own (nn.LSTM, nn.GRU, nn.RNN):
every step's projections, clipped per example.

torch's modules are not swapped: with grad their forward runs the unrolled recurrence of
``dpfused.layers.recurrent`` (``run_layers``) over the module's own parameters, so the model, its
``state_dict`` and its outputs stay torch's; without grad (evaluation) the fused kernel runs as
before. Dropout between layers (``dropout > 0`` in training) is ``F.dropout`` on each layer's
output, as nn's non-cuDNN path does: the same distribution, other draws than torch's kernel; a
mask is drawn independently of the data and applies to one example's rows alone, so every
per-example gradient still depends on its own example only. Refused, naming the module:
``proj_size > 0`` (an LSTM with projections: its ``weight_hr`` is not written out here) and a
subclass that overrides ``forward`` (the rule would compute nn's forward instead of the
subclass's).

A layer-direction uses ``W_ih`` and ``W_hh`` at every time step, so example i's gradient is a sum
over steps: ``G_i(W_ih) = sum_t g^x_{i,t} x_{i,t}^T`` and ``G_i(W_hh) = sum_t g^h_{i,t}
h_{i,t-1}^T``, with g the gradients of the projections ``W_ih x_t + b_ih`` and ``W_hh h_{t-1} +
b_hh``. Each is ONE factor piece with the steps stacked on the T axis (left ``(B, T, G*H)``,
right ``(B, T, in)``), so norms need no cross terms between steps (docs/design.md §3):

- the input projection of all steps is one ``linear_use`` over ``(B, T, in)``;
- the recurrence is one autograd node (``_Recurrence``) per layer-direction. Its forward runs the
  steps without building a graph; its backward walks the steps in reverse, re-running each step
  under autograd to get ``g^h_t`` and the gradients flowing to ``h_{t-1}``, ``c_{t-1}`` and the
  input projection, and delivers ``W_hh``'s and ``b_hh``'s pieces once, with every step in them.
  One node per direction is reached by backward whenever any of its outputs is used, even when the
  loss reads only some steps (``output[:, -1]`` of a bidirectional layer).

Pieces are batch-major in the caller's batch order whatever the layer's ``batch_first``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpfused.layers.recurrent import DPRNNBase, masked_step, run_layers, step_order, step_output
from dpfused.pieces import DensePiece, FactorPiece
from dpfused.rules import BaseRule, register
from dpfused.rules.linear import linear_use
from dpfused.rules.mha import _BatchFirstTap


@dataclass
class _Direction:
    """What one layer-direction's recurrence node needs besides tensors."""

    cell: Callable
    mask: torch.Tensor | None  # (B, T) bool
    reverse: bool
    tap: object


class _Recurrence(torch.autograd.Function):
    """(gx, state_0) -> (outputs (B, T, H), *state_T); backward delivers W_hh's and b_hh's pieces.

    ``weight_hh`` and ``bias_hh`` are inputs so that autograd reaches this node even when nothing
    else needs a gradient; their gradients are returned as None (never the unclipped batch sum).
    """

    @staticmethod
    def forward(ctx, direction, weight_hh, bias_hh, gx, *state):
        steps = gx.shape[1]
        outputs = [None] * steps
        before = [None] * steps  # state before each step, indexed by time
        for t in step_order(steps, direction.reverse):
            mask_t = _mask_at(direction.mask, t)
            before[t] = state
            hp = F.linear(state[0], weight_hh, bias_hh)
            state = masked_step(direction.cell, gx[:, t], hp, state, mask_t)
            outputs[t] = step_output(state[0], mask_t)
        ctx.direction, ctx.weight_hh, ctx.bias_hh = direction, weight_hh, bias_hh
        ctx.autocast = _autocast_state(gx.device.type)
        stacked = [torch.stack(parts, dim=1) for parts in zip(*before)]  # each (B, T, H)
        ctx.save_for_backward(gx, *stacked)
        return (torch.stack(outputs, dim=1), *state)

    @staticmethod
    def backward(ctx, grad_outputs, *grad_state):
        direction, weight_hh, bias_hh = ctx.direction, ctx.weight_hh, ctx.bias_hh
        gx, *before = ctx.saved_tensors
        with torch.autocast(**ctx.autocast):  # re-run the steps as the forward ran them
            with torch.no_grad():
                hp_all = F.linear(before[0], weight_hh, bias_hh)  # (B, T, G*H), as in forward
            grad_gx, grad_hp = torch.zeros_like(gx), torch.zeros_like(hp_all)
            grad_state = list(grad_state)
            for t in reversed(step_order(gx.shape[1], direction.reverse)):
                mask_t = _mask_at(direction.mask, t)
                grad_state[0] = grad_state[0] + step_output(grad_outputs[:, t], mask_t)
                grads = _step_vjp(direction.cell, gx[:, t], hp_all[:, t],
                                  tuple(s[:, t] for s in before), mask_t, grad_state)
                grad_gx[:, t], grad_hp[:, t] = grads[0], grads[1]
                grad_state = list(grads[2:])
                grad_state[0] = grad_state[0] + grads[1].matmul(weight_hh.to(grads[1].dtype))
        direction.tap.deliver(_pieces(weight_hh, bias_hh, grad_hp, before[0]))
        state_grads = [g if need else None for g, need in zip(grad_state, ctx.needs_input_grad[4:])]
        return (None, None, None, grad_gx if ctx.needs_input_grad[3] else None, *state_grads)


def _autocast_state(device_type):
    """The autocast settings in force, to re-enter in backward (which runs without them)."""
    return {"device_type": device_type, "enabled": torch.is_autocast_enabled(device_type),
            "dtype": torch.get_autocast_dtype(device_type)}


def _mask_at(mask, t):
    return None if mask is None else mask[:, t]


def _step_vjp(cell, gx_t, hp_t, state, mask_t, grad_state):
    """Gradients of one step's new state w.r.t. (gx_t, hp_t, *state), by re-running the step."""
    leaves = [gx_t.detach().requires_grad_(), hp_t.detach().requires_grad_(),
              *(s.detach().requires_grad_() for s in state)]
    with torch.enable_grad():
        new = masked_step(cell, leaves[0], leaves[1], tuple(leaves[2:]), mask_t)
        grads = torch.autograd.grad(new, leaves, grad_state, allow_unused=True)
    return [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]


def _pieces(weight_hh, bias_hh, grad_hp, h_before):
    """W_hh: G_i = sum_t g^h_{i,t} h_{i,t-1}^T (factors (B, T, G*H), (B, T, H)); b_hh: sum_t g^h."""
    pieces = []
    if weight_hh.requires_grad:
        # Under autocast the projection multiplied h in the gradient's (reduced) precision.
        pieces.append(FactorPiece(weight_hh, left=grad_hp, right=h_before.to(grad_hp.dtype)))
    if bias_hh is not None and bias_hh.requires_grad:
        pieces.append(DensePiece(bias_hh, grad_hp.sum(dim=1)))
    return pieces


class _PrivateOps:
    """The projections of dpfused.layers.recurrent, run so that their backward delivers pieces."""

    def __init__(self, tap):
        self.tap = tap

    def input_projection(self, x, weight, bias):
        return linear_use(x, weight, bias, tap=self.tap)  # x (B, T, in)

    def recurrence(self, cell, gx, state, mask, weight_hh, bias_hh, reverse):
        self.tap.record_forward(gx.shape[0])
        direction = _Direction(cell, mask, reverse, self.tap)
        output, *final = _Recurrence.apply(direction, weight_hh, bias_hh, gx, *state)
        return output, tuple(final)


_TORCH_RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)
# What nn's forward calls that changes values (the check_* methods only validate).
_COMPUTING_METHODS = ("forward", "permute_hidden")


@register(DPRNNBase, *_TORCH_RECURRENT)
class RecurrentRule(BaseRule):
    """DPLSTM, DPGRU, DPRNN and nn.LSTM, nn.GRU, nn.RNN: their own parameters, one piece per
    projection per forward."""

    name = "recurrent"

    def check(self, module, path):
        problem = torch_recurrent_problem(module, path)
        if problem is not None:
            raise ValueError(problem)

    def forward(self, module, tap, input, hx=None):
        return run_layers(module, input, hx, ops=_PrivateOps(_BatchFirstTap(tap)))


def torch_recurrent_problem(module: nn.Module, path: str) -> str | None:
    """Why the rule cannot run ``module`` (an nn.LSTM/GRU/RNN or a subclass) as torch would, or
    None (also for dpfused's own layers)."""
    base = next((cls for cls in _TORCH_RECURRENT if isinstance(module, cls)), None)
    if base is None:
        return None
    kind = type(module).__name__
    if getattr(module, "proj_size", 0):
        return (
            f"module '{path}' ({kind}) has proj_size={module.proj_size}: dpfused clips nn.LSTM "
            "as it is, but not its projection weight_hr; use proj_size=0 (and an nn.Linear on "
            "the outputs if needed) or freeze the layer")
    overridden = [name for name in _COMPUTING_METHODS
                  if getattr(type(module), name, None) is not getattr(base, name, None)]
    if overridden:
        return (
            f"module '{path}' ({kind}) subclasses nn.{base.__name__} and overrides "
            f"{', '.join(overridden)}: dpfused clips nn.{base.__name__}'s own forward, which "
            "would replace yours; "
            f"build the model from nn.{base.__name__} or dpfused.layers.DP{base.__name__}, or "
            "freeze the layer")
    return None
