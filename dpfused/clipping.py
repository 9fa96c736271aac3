"""Clipping groups and the book-keeping of one step (DESIGN §4).

Layers deliver pieces (per-example gradients in compact form) from their backward. The ``Bookkeeper``
routes each piece to the clipping group of its parameter. A group completes:

- inside the backward of its only layer, when that layer is its group's sole member, shares no
  parameter and was called once in this forward: the ``per_layer`` fast path, where the clipped
  weight gradient a^T diag(c) g is the only weight gradient ever computed;
- otherwise at the end of the backward pass (an autograd callback): ``flat`` book-keeping, groups
  joined by shared parameters, layers called more than once, recomputed (checkpointed) layers.

Completing a group: per-example group norms (cross terms for parameters used more than once),
multipliers c_i * loss_scale (``privacy_math``), clipped sums per parameter. Clipped sums of a pass
are merged into the step's sums only when the whole pass succeeded, so a failed pass leaves no half.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from dpfused import pieces as P
from dpfused import privacy_math

__all__ = ["Layer", "ClippingGroup", "build_groups", "Bookkeeper", "CLIPPING_MODES"]

CLIPPING_MODES = ("flat", "per_layer", "per_device")


@dataclass
class Layer:
    """An instrumented module: its path, rule and the trainable parameters its rule handles."""

    path: str
    module: nn.Module
    rule: object
    params: list[nn.Parameter]


@dataclass
class ClippingGroup:
    """Parameters clipped together, with threshold C_g."""

    name: str
    layers: list[str]
    params: list[nn.Parameter]
    threshold: float
    # Completes inside its layer's backward when that layer was called once (see module docstring).
    completes_in_backward: bool = False


def build_groups(layers, *, clipping, max_grad_norm, thresholds=None):
    """Partition the layers' parameters into clipping groups and set their thresholds.

    Args:
        layers: the instrumented layers.
        clipping: "flat", "per_layer" or "per_device".
        max_grad_norm: C, the total sensitivity: sqrt(sum_g C_g^2) = C by default.
        thresholds: per_layer/per_device only: a dict {group name: C_g} or a list in group order.

    Returns:
        The groups, in model order.
    """
    if clipping == "flat":
        if thresholds is not None:
            raise ValueError("max_grad_norm is the only threshold of clipping='flat'; drop thresholds=")
        params = _unique(p for layer in layers for p in layer.params)
        return [ClippingGroup("all", [l.path for l in layers], params, float(max_grad_norm))]
    if clipping == "per_layer":
        groups = _groups_by_shared_params(layers)
    else:
        groups = _groups_by_device(layers)
    _assign_thresholds(groups, max_grad_norm, thresholds)
    return groups


def _unique(params):
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _groups_by_shared_params(layers):
    """One group per layer; layers that share a parameter are joined (union-find)."""
    parent = list(range(len(layers)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner = {}
    for i, layer in enumerate(layers):
        for p in layer.params:
            if id(p) in owner:
                parent[root(i)] = root(owner[id(p)])
            else:
                owner[id(p)] = i
    members = defaultdict(list)
    for i in range(len(layers)):
        members[root(i)].append(layers[i])
    groups = []
    for group_layers in members.values():
        params = _unique(p for l in group_layers for p in l.params)
        shared = sum(len(l.params) for l in group_layers) != len(params)
        groups.append(ClippingGroup(
            name="+".join(l.path for l in group_layers),
            layers=[l.path for l in group_layers],
            params=params,
            threshold=0.0,
            completes_in_backward=len(group_layers) == 1 and not shared,
        ))
    return groups


def _groups_by_device(layers):
    by_device = defaultdict(list)
    for p in _unique(p for layer in layers for p in layer.params):
        by_device[str(p.device)].append(p)
    groups = []
    for device, params in by_device.items():
        ids = {id(p) for p in params}
        names = [l.path for l in layers if any(id(p) in ids for p in l.params)]
        groups.append(ClippingGroup(device, names, params, 0.0))
    return groups


def _assign_thresholds(groups, max_grad_norm, thresholds):
    names = [g.name for g in groups]
    if thresholds is None:
        values = privacy_math.default_group_thresholds(max_grad_norm, len(groups))
    elif isinstance(thresholds, dict):
        unknown = sorted(set(thresholds) - set(names))
        missing = [n for n in names if n not in thresholds]
        if unknown or missing:
            raise ValueError(
                f"thresholds: keys must be exactly the clipping groups; unknown {unknown}, "
                f"missing {missing}. Group names: {names}"
            )
        values = [thresholds[n] for n in names]
    elif isinstance(thresholds, (list, tuple)):
        if len(thresholds) != len(groups):
            raise ValueError(
                f"thresholds: got {len(thresholds)} values for {len(groups)} clipping groups "
                f"({names})"
            )
        values = list(thresholds)
    else:
        raise TypeError(f"thresholds must be a dict or a list, got {type(thresholds).__name__}")
    for name, value in zip(names, values):
        value = float(value)
        if not value > 0 or value == float("inf"):
            raise ValueError(f"thresholds: group '{name}' has threshold {value}; it must be > 0 and finite")
    for group, value in zip(groups, values):
        group.threshold = float(value)


class _LayerTap:
    """What one layer's rule talks to: forward counting and piece delivery."""

    def __init__(self, book, layer):
        self._book, self.layer = book, layer
        self.batch_first = book.batch_first

    def record_forward(self, batch=None):
        self._book.record_forward(self.layer, batch)

    @property
    def forward_batch(self):
        return self._book.forward_batch

    def deliver(self, pieces):
        self._book.deliver(self.layer, pieces)


@dataclass
class StepSums:
    """What the optimizer takes at a step: clipped sums by parameter id, and how they were made."""

    sums: dict[int, torch.Tensor] = field(default_factory=dict)
    # Adaptive thresholds only: per group index, sum_i (1[||G_ig|| <= C_g] - 1/2), un-noised.
    # Private: only privacy_math.noised_counts may read it.
    unclipped: dict[int, torch.Tensor] = field(default_factory=dict)
    examples: int = 0
    backward_passes: int = 0


class Bookkeeper:
    """Collects pieces during backward passes and turns them into clipped sums."""

    def __init__(self, groups, *, loss_reduction, batch_first, count_unclipped=False):
        self.groups = groups
        self.count_unclipped = count_unclipped  # adaptive thresholds need per-group counts
        self.loss_reduction = loss_reduction
        self.batch_first = batch_first
        self._group_of = {id(p): i for i, g in enumerate(groups) for p in g.params}
        self._params = [p for g in groups for p in g.params]
        self.paths: dict[str, str] = {}  # layer -> "ghost" | "direct", for explain()
        self._step = StepSums()
        self._failure: str | None = None
        self._reset_pass()
        self._reset_forward()

    def tap(self, layer):
        return _LayerTap(self, layer)

    # ---- forward ---------------------------------------------------------------------------
    def record_forward(self, layer, batch=None):
        if not torch.is_grad_enabled():
            return
        task = torch._C._current_graph_task_id()
        if task == -1:
            self._expected[layer.path] += 1
            if batch is not None and batch != 1:
                self.forward_batch = batch
            return
        # A forward re-run inside a backward (activation checkpointing). It is not counted, so
        # its groups complete at the end of the pass. Reentrant checkpointing then runs a nested
        # backward (a new graph task): mark this task as its host so the nested task's pieces
        # join this pass instead of starting a new one (DESIGN §4: one backward, one clipping).
        self._enter_pass()
        self._hosts.add(task)

    # ---- backward --------------------------------------------------------------------------
    def deliver(self, layer, pieces):
        self._enter_pass()
        self._arrived[layer.path] += 1
        touched = set()
        for piece in pieces:
            self._check_batch(layer, piece.batch_size)
            g = self._group_of[id(piece.param)]
            if not self._completes_now(g, layer):
                piece = P.compact(piece)  # kept until the end of backward: keep the smaller form
            self._pieces[g].append((layer.path, piece))
            touched.add(g)
        for g in touched:
            if self._completes_now(g, layer):
                self._complete(g)

    def _completes_now(self, g, layer):
        """The per_layer fast path: the group's only layer, called once, has delivered."""
        return (self.groups[g].completes_in_backward and self._expected[layer.path] == 1
                and self._arrived[layer.path] == 1)

    def _enter_pass(self):
        task = torch._C._current_graph_task_id()
        if task == self._task or task in self._nested:
            return
        if self._task is not None and self._hosts:
            self._nested.add(task)  # a backward nested in this pass (reentrant checkpointing)
            return
        if self._failure is not None:
            raise RuntimeError(
                f"{self._failure}; call optimizer.zero_grad() before the next backward pass"
            )
        self._reset_pass()
        self._task = task
        torch.autograd.Variable._execution_engine.queue_callback(self._end_pass)

    def _reset_pass(self):
        self._task = None
        self._hosts: set[int] = set()  # graph tasks of this pass that re-ran forwards
        self._nested: set[int] = set()  # backward tasks nested in this pass
        self._pieces = defaultdict(list)
        self._arrived = defaultdict(int)
        self._pass_batch = None
        self._pass_sums: dict[int, torch.Tensor] = {}
        self._pass_counts: dict[int, torch.Tensor] = {}

    def _reset_forward(self):
        self._expected = defaultdict(int)  # forward calls per layer since the last pass
        # Batch size seen by the layers of the current forward (for broadcast lookups, see
        # rules/embedding.py).
        self.forward_batch: int | None = None

    def _check_batch(self, layer, batch):
        if self._pass_batch is None:
            self._pass_batch = batch
        elif batch != self._pass_batch:
            self._fail(
                f"module '{layer.path}' saw {batch} examples in this backward pass but other layers "
                f"saw {self._pass_batch}: the first dimension of its input is not the batch "
                "(was (B, T) flattened into B*T, or is the model sequence-first? then pass "
                "batch_first=False)"
            )

    def _fail(self, message):
        self._failure = message
        raise ValueError(message)

    def _loss_scale(self):
        return float(self._pass_batch) if self.loss_reduction == "mean" else 1.0

    def _complete(self, g):
        group = self.groups[g]
        tagged = self._pieces.pop(g)
        norm_sq = self._group_norm_sq(tagged)
        if not torch.isfinite(norm_sq).all():
            bad = torch.nonzero(~torch.isfinite(norm_sq)).flatten().tolist()[:10]
            self._fail(
                f"non-finite per-example gradient norm in clipping group '{group.name}' for "
                f"examples {bad} of this batch; no step was taken from this backward pass "
                "(check the loss for inf/nan, e.g. an example with no counted token)"
            )
        multipliers = privacy_math.example_multipliers(norm_sq, group.threshold, self._loss_scale())
        if self.count_unclipped:
            self._pass_counts[g] = privacy_math.centered_unclipped_count(
                norm_sq, group.threshold, self._loss_scale())
        for path, piece in tagged:
            clipped = P.weighted_sum(piece, multipliers)
            key = id(piece.param)
            if key in self._pass_sums:
                self._pass_sums[key].add_(clipped)
            else:
                self._pass_sums[key] = clipped

    def _group_norm_sq(self, tagged):
        by_param = defaultdict(list)
        for path, piece in tagged:
            by_param[id(piece.param)].append(piece)
        total = None
        for plist in by_param.values():
            for i, p in enumerate(plist):
                terms = [P.norm_sq(p)] + [2 * P.inner(p, q) for q in plist[i + 1:]]
                for term in terms:
                    total = term.clone() if total is None else total + term.to(total.dtype)
        for path, piece in tagged:
            if isinstance(piece, P.FactorPiece) and piece.path:
                self.paths[path] = piece.path
        return total

    def _end_pass(self):
        if self._failure is not None:
            return
        for g in list(self._pieces):
            self._complete(g)
        self._check_no_autograd_gradients()
        _merge(self._step.sums, self._pass_sums)
        if self.count_unclipped:
            _merge(self._step.unclipped, self._pass_counts_of_every_group())
        self._step.examples += self._pass_batch or 0
        self._step.backward_passes += 1
        self._reset_pass()
        self._reset_forward()

    def _check_no_autograd_gradients(self):
        leaked = [p for p in self._params if p.grad is not None and bool(p.grad.any())]
        if leaked:
            self._fail(
                f"{len(leaked)} private parameter(s) (first of shape {tuple(leaked[0].shape)}) hold "
                "a gradient that did not come through dpfused: either the gradients of the last "
                "step were not cleared (call optimizer.zero_grad() after each optimizer.step()), or "
                "a parameter is used outside its module's forward (e.g. F.linear(x, layer.weight)), "
                "which dpfused cannot clip per example; call the module instead"
            )

    def _pass_counts_of_every_group(self):
        """A group no example touched in this pass (an unused layer) clipped nobody: +1/2 each."""
        examples = self._pass_batch or 0
        return {g: self._pass_counts.get(g, torch.tensor(0.5 * examples, dtype=torch.float64))
                for g in range(len(self.groups))}

    # ---- step ------------------------------------------------------------------------------
    def take_step_sums(self) -> StepSums:
        """The clipped sums accumulated since the last step; the book starts a new step."""
        if self._failure is not None:
            raise RuntimeError(f"{self._failure}; call optimizer.zero_grad() and redo the batch")
        if self._task is not None:
            raise RuntimeError(
                "optimizer.step() was called while a backward pass is unfinished (during "
                "backward, or after a backward that raised: then call optimizer.zero_grad() and "
                "redo the batch)"
            )
        step, self._step = self._step, StepSums()
        return step

    def peek_step(self) -> StepSums:
        return self._step

    def clear(self):
        """Forget the step's sums and any failure (optimizer.zero_grad())."""
        self._step = StepSums()
        self._failure = None
        self._reset_pass()
        self._reset_forward()


def _merge(into: dict, new: dict) -> None:
    """Add a pass's tensors into the step's, in place (the pass's dict is dropped afterwards)."""
    for key, value in new.items():
        if key in into:
            into[key].add_(value.to(into[key].device))
        else:
            into[key] = value
