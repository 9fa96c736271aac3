"""DPLSTM, DPGRU, DPRNN: drop-in replacements for nn.LSTM, nn.GRU, nn.RNN that dpfused can clip.

Same constructor arguments, parameter names (``weight_ih_l0``, ``bias_hh_l1_reverse``, ...), forward
signature and outputs as the ``nn`` classes, so ``load_state_dict`` moves weights either way. The
recurrence is written out step by step in Python instead of calling cuDNN's fused kernel, because
per-example clipping needs what the fused kernel hides: the gradient of every step's projections.

Each layer and direction makes two projections, the input projection ``W_ih x_t + b_ih`` of every
step at once (one linear over ``(B, T, in)``) and the hidden projection ``W_hh h_{t-1} + b_hh`` of
each step in turn. How they run is up to an ``ops`` object: ``PLAIN`` here (ordinary autograd, used
outside training and when the module is not private), or dpfused's recurrent rule
(``dpfused.rules.recurrent``), which hands over one factor piece per projection with the time steps
stacked, so example i's gradient of ``W_hh`` is ``sum_t g_{i,t} h_{i,t-1}^T`` (docs/design.md §3).
The forward itself, ``run_layers``, reads only ``nn.RNNBase``'s attributes and parameter names: the
same rule runs torch's own ``nn.LSTM``/``nn.GRU``/``nn.RNN`` through it, unchanged.

Internally every sequence is batch-major ``(B, T, features)`` in the caller's batch order; a
``PackedSequence`` is padded, run with a mask (a finished sequence keeps its state), and packed
again with the input's ``batch_sizes`` and sort order, as ``nn`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from dpfused.arguments import check_integer, check_number

__all__ = ["DPRNNBase", "DPLSTM", "DPGRU", "DPRNN", "dp_equivalent", "PLAIN", "run_layers"]

State = tuple  # (h,) for GRU and RNN, (h, c) for LSTM; each (B, H)


# ---- cells: one step, from the two projections ---------------------------------------------------
def lstm_cell(gx: torch.Tensor, hp: torch.Tensor, state: State) -> State:
    """nn.LSTM's step: gates in the order i, f, g, o; ``gx``, ``hp`` (B, 4H)."""
    _, c = state
    i, f, g, o = (gx + hp).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def gru_cell(gx: torch.Tensor, hp: torch.Tensor, state: State) -> State:
    """nn.GRU's step: gates r, z, n; r scales n's hidden projection, bias included."""
    (h,) = state
    x_r, x_z, x_n = gx.chunk(3, dim=-1)
    h_r, h_z, h_n = hp.chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return ((1 - z) * n + z * h,)


def rnn_tanh_cell(gx: torch.Tensor, hp: torch.Tensor, state: State) -> State:
    return (torch.tanh(gx + hp),)


def rnn_relu_cell(gx: torch.Tensor, hp: torch.Tensor, state: State) -> State:
    return (torch.relu(gx + hp),)


_CELLS = {"LSTM": (lstm_cell, 4), "GRU": (gru_cell, 3), "RNN_TANH": (rnn_tanh_cell, 1),
          "RNN_RELU": (rnn_relu_cell, 1)}


def masked_step(cell: Callable, gx_t, hp_t, state: State, mask_t) -> State:
    """One step; rows whose sequence has ended (``mask_t`` False) keep their state."""
    new = cell(gx_t, hp_t, state)
    if mask_t is None:
        return new
    keep = mask_t.unsqueeze(-1)  # (B, 1)
    return tuple(torch.where(keep, n, s) for n, s in zip(new, state))


def step_order(length: int, reverse: bool) -> range:
    return range(length - 1, -1, -1) if reverse else range(length)


def step_output(h_t: torch.Tensor, mask_t) -> torch.Tensor:
    """The output at a step: the hidden state, zero past the end of the sequence (as padding)."""
    return h_t if mask_t is None else h_t.masked_fill(~mask_t.unsqueeze(-1), 0)


# ---- how the projections run -------------------------------------------------------------------
class _PlainOps:
    """Ordinary autograd: the module's forward when it is not instrumented."""

    @staticmethod
    def input_projection(x, weight, bias):
        return F.linear(x, weight, bias)  # (B, T, G*H)

    @staticmethod
    def recurrence(cell, gx, state, mask, weight_hh, bias_hh, reverse):
        outputs = [None] * gx.shape[1]
        for t in step_order(gx.shape[1], reverse):
            mask_t = None if mask is None else mask[:, t]
            hp = F.linear(state[0], weight_hh, bias_hh)
            state = masked_step(cell, gx[:, t], hp, state, mask_t)
            outputs[t] = step_output(state[0], mask_t)
        return torch.stack(outputs, dim=1), state  # (B, T, H), final state


PLAIN = _PlainOps()


# ---- inputs and outputs ------------------------------------------------------------------------
@dataclass
class _Sequence:
    """The input as ``(B, T, features)`` in the caller's batch order, and how to give it back."""

    x: torch.Tensor
    mask: torch.Tensor | None  # (B, T) bool: position t of example b is part of its sequence
    packed: PackedSequence | None
    batched: bool
    batch_first: bool

    @classmethod
    def of(cls, input, *, batch_first: bool, name: str) -> "_Sequence":
        if isinstance(input, PackedSequence):
            padded, lengths = pad_packed_sequence(input, batch_first=True)  # caller's order
            steps = torch.arange(padded.shape[1], device=padded.device)
            mask = steps.unsqueeze(0) < lengths.to(padded.device).unsqueeze(1)
            return cls(padded, mask, input, True, batch_first)
        if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
            found = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
            raise ValueError(
                f"{name}: input must be a 3-D tensor (batched), a 2-D tensor (one unbatched "
                f"sequence) or a PackedSequence; got {found}"
            )
        if input.dim() == 2:
            return cls(input.unsqueeze(0), None, None, False, batch_first)
        return cls(input if batch_first else input.transpose(0, 1), None, None, True, batch_first)

    def output(self, y: torch.Tensor):
        """``y`` (B, T, F) in the caller's layout: a PackedSequence like the input, or a tensor."""
        if self.packed is not None:
            sorted_indices = self.packed.sorted_indices
            ordered = y if sorted_indices is None else y.index_select(0, sorted_indices)
            lengths = _lengths_of(self.packed.batch_sizes)
            data = pack_padded_sequence(ordered, lengths, batch_first=True).data
            return PackedSequence(data, self.packed.batch_sizes, sorted_indices,
                                  self.packed.unsorted_indices)
        if not self.batched:
            return y.squeeze(0)
        return y if self.batch_first else y.transpose(0, 1)


def _lengths_of(batch_sizes: torch.Tensor) -> torch.Tensor:
    """Sequence lengths in sorted order from a PackedSequence's batch_sizes (CPU int64)."""
    steps = torch.arange(int(batch_sizes[0]))
    return (batch_sizes.unsqueeze(0) > steps.unsqueeze(1)).sum(dim=1)


# ---- the forward, for any module with nn.RNNBase's attributes and parameter names ------------------
def run_layers(module: nn.Module, input, hx=None, *, ops=PLAIN):
    """``module``'s forward, every layer and direction unrolled step by step, the projections run
    by ``ops``.

    ``module`` is a DPLSTM/DPGRU/DPRNN or an ``nn.LSTM``/``nn.GRU``/``nn.RNN`` without
    ``proj_size``: anything with ``nn.RNNBase``'s attributes (``mode``, ``hidden_size``,
    ``num_layers``, ``bias``, ``batch_first``, ``dropout``, ``bidirectional``, ``training``) and
    parameter names (``weight_ih_l0``, ``bias_hh_l1_reverse``, ...). Same outputs as nn's.
    """
    name = type(module).__name__
    seq = _Sequence.of(input, batch_first=module.batch_first, name=name)
    state0 = _initial_state(module, hx, seq)  # each (L*D, B, H)
    directions = _directions_of(module)
    x, finals = seq.x, []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            out, final = _run_direction(module, ops, x, seq.mask, layer, direction,
                                        tuple(s[k] for s in state0))
            outputs.append(out)
            finals.append(final)
        x = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]  # (B, T, D*H)
        if module.dropout and module.training and layer < module.num_layers - 1:
            x = F.dropout(x, module.dropout, training=True)
    state_n = tuple(torch.stack(parts) for parts in zip(*finals))  # each (L*D, B, H)
    if not seq.batched:
        state_n = tuple(s.squeeze(1) for s in state_n)
    return seq.output(x), (state_n if module.mode == "LSTM" else state_n[0])


def _directions_of(module) -> int:
    return 2 if module.bidirectional else 1


def _run_direction(module, ops, x, mask, layer, direction, state):
    suffix = _suffix(layer, direction)
    bias_ih = getattr(module, "bias_ih" + suffix) if module.bias else None
    bias_hh = getattr(module, "bias_hh" + suffix) if module.bias else None
    gx = ops.input_projection(x, getattr(module, "weight_ih" + suffix), bias_ih)  # (B, T, G*H)
    cell = _CELLS[module.mode][0]
    return ops.recurrence(cell, gx, state, mask, getattr(module, "weight_hh" + suffix), bias_hh,
                          direction == 1)


def _initial_state(module, hx, seq: _Sequence) -> State:
    name, components = type(module).__name__, 2 if module.mode == "LSTM" else 1
    batch, layers = seq.x.shape[0], module.num_layers * _directions_of(module)
    if hx is None:
        zeros = seq.x.new_zeros(layers, batch, module.hidden_size)
        return (zeros,) * components
    given = tuple(hx) if components == 2 else (hx,)
    if components == 2 and len(given) != 2:
        raise ValueError(f"{name}: hx must be a pair (h_0, c_0); got {len(given)} tensors")
    expected = (layers, batch, module.hidden_size) if seq.batched else (layers, module.hidden_size)
    for part in given:
        if not isinstance(part, torch.Tensor) or tuple(part.shape) != expected:
            found = tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
            raise ValueError(f"{name}: each initial state in hx must have shape {expected} "
                             f"(num_layers * num_directions, batch, hidden_size); got {found}")
    return given if seq.batched else tuple(p.unsqueeze(1) for p in given)


# ---- the modules -------------------------------------------------------------------------------
class DPRNNBase(nn.Module):
    """What DPLSTM, DPGRU and DPRNN share; construct one of those.

    Attributes match ``nn.RNNBase``: ``mode``, ``input_size``, ``hidden_size``, ``num_layers``,
    ``bias``, ``batch_first``, ``dropout``, ``bidirectional``, ``proj_size`` (always 0).
    """

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        _check_arguments(name, input_size, hidden_size, num_layers, dropout, proj_size)
        self.mode = mode
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.bidirectional = bias, batch_first, bidirectional
        self.dropout = float(dropout)
        self.proj_size = 0
        self._cell, gates = _CELLS[mode]
        directions = 2 if bidirectional else 1
        factory = {"device": device, "dtype": dtype}
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * directions
            for direction in range(directions):
                suffix = _suffix(layer, direction)
                shapes = {"weight_ih": (gates * hidden_size, layer_input),
                          "weight_hh": (gates * hidden_size, hidden_size)}
                if bias:
                    shapes.update(bias_ih=(gates * hidden_size,), bias_hh=(gates * hidden_size,))
                for kind, shape in shapes.items():  # nn's order: w_ih, w_hh, b_ih, b_hh
                    self.register_parameter(kind + suffix,
                                            nn.Parameter(torch.empty(shape, **factory)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.RNNBase's initialization: every parameter uniform in ±1/sqrt(hidden_size)."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def flatten_parameters(self) -> None:
        """No-op, for code written for cuDNN's nn.LSTM: the weights are never flattened here."""

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Per layer and direction, its parameters in nn's order (as ``nn.RNNBase.all_weights``)."""
        kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")[: 4 if self.bias else 2]
        return [[getattr(self, kind + _suffix(layer, direction)) for kind in kinds]
                for layer in range(self.num_layers) for direction in range(self._directions)]

    @property
    def _directions(self) -> int:
        return 2 if self.bidirectional else 1

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            text += f", num_layers={self.num_layers}"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            text += f", nonlinearity={self.nonlinearity!r}"
        for flag, default in (("bias", True), ("batch_first", False), ("dropout", 0.0),
                              ("bidirectional", False)):
            if getattr(self, flag) != default:
                text += f", {flag}={getattr(self, flag)}"
        return text

    def forward(self, input, hx=None):
        """As ``nn.RNN``/``nn.GRU`` (``hx`` a tensor) or ``nn.LSTM`` (``hx`` = ``(h_0, c_0)``)."""
        return self.run(input, hx, ops=PLAIN)

    def run(self, input, hx=None, *, ops=PLAIN):
        """The forward with the projections run by ``ops`` (see the module docstring)."""
        return run_layers(self, input, hx, ops=ops)


class DPLSTM(DPRNNBase):
    """Drop-in ``nn.LSTM`` whose per-example gradients dpfused computes exactly (no ``proj_size``).

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device,
            dtype: as ``nn.LSTM``.
        proj_size: must be 0; LSTMs with projections are not supported.

    Raises:
        ValueError: an argument ``nn.LSTM`` refuses, or ``proj_size`` other than 0.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype)


class DPGRU(DPRNNBase):
    """Drop-in ``nn.GRU`` whose per-example gradients dpfused computes exactly.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device,
            dtype: as ``nn.GRU``.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype)


class DPRNN(DPRNNBase):
    """Drop-in ``nn.RNN`` (Elman, tanh or relu): per-example gradients computed exactly by dpfused.

    Args:
        input_size, hidden_size, num_layers, nonlinearity, bias, batch_first, dropout,
            bidirectional, device, dtype: as ``nn.RNN`` (same positional order).

    Raises:
        ValueError: ``nonlinearity`` is not "tanh" or "relu".
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"DPRNN: unknown nonlinearity {nonlinearity!r}; use 'tanh' or 'relu'")
        self.nonlinearity = nonlinearity
        super().__init__(f"RNN_{nonlinearity.upper()}", input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, 0, device, dtype)


def _suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction == 1 else "")


def _check_arguments(name, input_size, hidden_size, num_layers, dropout, proj_size):
    if proj_size != 0:
        raise ValueError(
            f"{name}: proj_size={proj_size} is not supported by dpfused's recurrent layers; "
            "use proj_size=0, or add an nn.Linear on the outputs (its gradient is clipped too)"
        )
    for arg, value in (("input_size", input_size), ("hidden_size", hidden_size),
                       ("num_layers", num_layers)):
        check_integer(f"{name}: {arg}", value)
    check_number(f"{name}: dropout", dropout, "a number in [0, 1]", lambda v: 0 <= v <= 1)


_DP_CLASS_OF = {nn.LSTM: DPLSTM, nn.GRU: DPGRU, nn.RNN: DPRNN}


def dp_equivalent(module: nn.Module) -> DPRNNBase:
    """A DPLSTM/DPGRU/DPRNN computing the same function as an ``nn.LSTM``/``nn.GRU``/``nn.RNN``.

    Same configuration, device, dtype, weights (copied), ``requires_grad`` flags, train/eval mode.

    Raises:
        TypeError: ``module`` is not exactly one of those three classes (a subclass may have
            changed ``forward``).
        ValueError: an LSTM with ``proj_size``.
    """
    dp_class = _DP_CLASS_OF.get(type(module))
    if dp_class is None:
        raise TypeError(f"dp_equivalent takes an nn.LSTM, nn.GRU or nn.RNN; got "
                        f"{type(module).__name__}")
    kwargs = {"num_layers": module.num_layers, "bias": module.bias,
              "batch_first": module.batch_first, "dropout": module.dropout,
              "bidirectional": module.bidirectional}
    if dp_class is DPRNN:
        kwargs["nonlinearity"] = module.nonlinearity
    if dp_class is DPLSTM:
        kwargs["proj_size"] = module.proj_size
    first = next(module.parameters())
    replacement = dp_class(module.input_size, module.hidden_size, **kwargs,
                           device=first.device, dtype=first.dtype)
    replacement.load_state_dict(module.state_dict())
    for name, param in module.named_parameters():
        getattr(replacement, name).requires_grad_(param.requires_grad)
    return replacement.train(module.training)
