"""Clipping groups and their thresholds (docs/design.md §4).

Parameters are partitioned into groups g = 1..K with thresholds C_g; the sensitivity of the
concatenated clipped sum is sqrt(sum_g C_g^2). ``flat`` is one group, ``per_layer`` a group per
layer (layers sharing a parameter are joined), ``per_parameter`` a group per parameter tensor
(Opacus' per-layer clipping: a layer's weight and bias are clipped apart), ``per_device`` a group
per device.
``set_thresholds`` is the one place a threshold is written.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch.nn as nn

from dpfused import privacy_math

__all__ = ["CLIPPING_MODES", "ClippingGroup", "Layer", "build_groups", "set_thresholds"]

CLIPPING_MODES = ("flat", "per_layer", "per_parameter", "per_device")


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
        clipping: "flat", "per_layer", "per_parameter" or "per_device".
        max_grad_norm: C, the total sensitivity: sqrt(sum_g C_g^2) = C by default.
        thresholds: group-wise modes only: a dict {group name: C_g} or a list in group order
            (per_parameter groups are named by the parameter, e.g. "fc1.weight").

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
    elif clipping == "per_parameter":
        groups = _groups_by_parameter(layers)
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


def _groups_by_parameter(layers):
    """One group per parameter tensor, named by its first layer's path and its local name. A
    layer's pieces then go to several groups; a group completes inside backward when a single
    layer holds its parameter (the book-keeper's fast path, per group)."""
    holders = defaultdict(list)
    for layer in layers:
        for p in layer.params:
            holders[id(p)].append(layer)
    groups = []
    for p in _unique(p for layer in layers for p in layer.params):
        first = holders[id(p)][0]
        local = next(n for n, q in first.module.named_parameters() if q is p)
        groups.append(ClippingGroup(
            name=f"{first.path}.{local}" if first.path else local,
            layers=[l.path for l in holders[id(p)]],
            params=[p],
            threshold=0.0,
            completes_in_backward=len(holders[id(p)]) == 1,
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
        values = list(thresholds)
    else:
        raise TypeError(f"thresholds must be a dict or a list, got {type(thresholds).__name__}")
    set_thresholds(groups, values)


def set_thresholds(groups: list[ClippingGroup], values) -> None:
    """Write C_g of every group: the one place thresholds are written (at construction, by
    adaptive clipping after a step, and when a checkpoint is loaded). All or nothing.

    Raises:
        ValueError: a count that does not match the groups, or a threshold not > 0 and finite.
    """
    values = [float(v) for v in values]
    if len(values) != len(groups):
        raise ValueError(
            f"thresholds: got {len(values)} values for {len(groups)} clipping groups "
            f"({[g.name for g in groups]})"
        )
    for group, value in zip(groups, values):
        if not value > 0 or value == float("inf"):
            raise ValueError(
                f"thresholds: group '{group.name}' has threshold {value}; it must be > 0 and finite")
    for group, value in zip(groups, values):
        group.threshold = value
