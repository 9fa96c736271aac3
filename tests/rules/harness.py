"""One-layer oracle harness shared by the per-rule tests (tests/rules/test_<rule>.py).

Each rule test builds a model holding ONE instrumented layer (``OneLayer``), a float64 batch and
the trivial loss ``half_square`` (0.5 * ||output||^2 per example), then checks two things against
per-example gradients from torch.func (tests/oracle.py):

- ``rule_pieces``: the rule alone, driven by a collecting tap: the pieces' per-example norms
  (``norm_sq`` plus cross terms ``inner``) and clipped sums (``weighted_sum``) equal the oracle's,
  and each piece reports the norm path it took (``norm_path``), before and after ``compact()``;
- ``released_matches_oracle``: the public API (``PrivacyEngine.make_private``, sigma = 0, summed
  loss, one cyclic batch): the released gradient equals the oracle's clipped sum, and
  ``dpfused.explain`` shows the layer's norm path.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from dpfused.instrument import detach
from dpfused.rules import fallback_rule, rule_for
from tests.oracle import clipped_sums, per_example_grads, snapshot

TOLERANCE = 1e-9  # float64 rounding


def half_square(out: torch.Tensor) -> torch.Tensor:
    """The trivial loss: 0.5 * ||output||^2, summed over the batch (so a per-example gradient
    of the layer's output is the output itself)."""
    return 0.5 * out.pow(2).sum()


def plain_call(layer: nn.Module, *inputs):
    return layer(*inputs)


class OneLayer(nn.Module):
    """A model of one layer: ``call(layer, *inputs)`` runs it (default: ``layer(*inputs)``)."""

    def __init__(self, layer: nn.Module, call: Callable = plain_call):
        super().__init__()
        self.layer, self.call = layer, call

    def forward(self, *inputs):
        return self.call(self.layer, *inputs)


def factor_path(*, seq: int, rows: int, cols: int, flat: bool) -> str:
    """The norm path a factor piece of shape (B, seq, rows) x (B, seq, cols) must report.

    Written from docs/design.md §3-4, independently of the library: ghost when T = 1 or
    T(m+n) < mn, else direct; kept to the end of backward (flat) the piece is materialized when its
    per-example gradients (mn numbers) are smaller than its factors (T(m+n)).
    """
    if flat and rows * cols < seq * (rows + cols):
        return "direct (materialized)"
    return "ghost" if seq == 1 or seq * (rows + cols) < rows * cols else "direct"


def oracle_grads(model: nn.Module, inputs: tuple, loss=half_square) -> dict[str, torch.Tensor]:
    def example_loss(call, batched):
        return loss(call(*batched))

    return per_example_grads(snapshot(model), example_loss, inputs)


class CollectingTap:
    """A ``dpfused.rules.Tap`` that keeps the delivered pieces (batch-first models only)."""

    batch_first = True
    forward_batch = None

    def __init__(self):
        self.pieces = []

    def record_forward(self, batch=None):
        pass

    def deliver(self, pieces):
        self.pieces.extend(pieces)


def rule_pieces(model: OneLayer, inputs: tuple, *, rule_call=None, loss=half_square):
    """The rule's pieces for one backward of ``loss``, checked against the oracle.

    Args:
        model: a ``OneLayer`` (not instrumented); a copy is run, the model is left untouched.
        inputs: the batch.
        rule_call: ``(rule, layer, tap, *inputs) -> output``; default ``rule.forward(layer, tap,
            *inputs)``.

    Returns:
        {parameter name: [pieces]}, after their ``norm_sq`` ran (``norm_path`` is set).
    """
    grads = oracle_grads(model, inputs, loss)
    work = copy.deepcopy(model)
    layer = work.layer
    rule = rule_for(layer) or fallback_rule()
    tap = CollectingTap()
    out = (rule_call or _rule_forward)(rule, layer, tap, *inputs)
    loss(out).backward()
    names = {id(p): f"layer.{n}" for n, p in layer.named_parameters()}
    by_name = defaultdict(list)
    for piece in tap.pieces:
        by_name[names[id(piece.param)]].append(piece)
    assert set(by_name) == set(grads), f"pieces for {set(by_name)}, oracle {set(grads)}"
    weights = torch.linspace(0.5, 1.5, len(inputs[0]), dtype=torch.float64)
    for name, plist in by_name.items():
        _assert_norms_and_sums(name, plist, grads[name], weights)
    return dict(by_name)


def _rule_forward(rule, layer, tap, *inputs):
    return rule.forward(layer, tap, *inputs)


def _assert_norms_and_sums(name, plist, grads, weights):
    batch = grads.shape[0]
    expected_norm_sq = grads.reshape(batch, -1).pow(2).sum(dim=1)
    expected_sum = torch.einsum("b,b...->...", weights, grads)
    norm_sq = _summed_norm_sq(plist)
    _assert_close(f"{name} norm_sq", norm_sq, expected_norm_sq)
    _assert_close(f"{name} weighted_sum", sum(p.weighted_sum(weights) for p in plist), expected_sum)
    compacted = [p.compact() for p in plist]
    _assert_close(f"{name} norm_sq after compact()", _summed_norm_sq(compacted), expected_norm_sq)
    _assert_close(f"{name} weighted_sum after compact()",
                  sum(p.weighted_sum(weights) for p in compacted), expected_sum)
    for p in plist:  # norm_sq again on the originals: their path, not the compacted one's, is kept
        p.norm_sq()


def _summed_norm_sq(plist):
    total = 0
    for i, p in enumerate(plist):
        total = total + p.norm_sq() + sum(2 * p.inner(q) for q in plist[i + 1:])
    return total


def _assert_close(what, ours, expected):
    err = (ours.double() - expected).norm() / expected.norm().clamp_min(1e-30)
    assert err < TOLERANCE, f"{what}: relative error {err:.3g}"


def released_matches_oracle(model: OneLayer, inputs: tuple, *, clipping: str,
                            loss=half_square) -> str:
    """Train one step through the public API and compare the released gradient with the oracle.

    sigma = 0, a summed loss and one cyclic batch holding every example: the released gradient is
    then exactly sum_i c_i G_i. C is the median per-example norm, so some examples are clipped.
    With one layer, "flat" and "per_layer" both form one group of threshold C.

    Returns:
        The ``norm path`` cell of ``dpfused.explain(model)`` for the layer.
    """
    batch = len(inputs[0])
    grads = oracle_grads(model, inputs, loss)
    norms = torch.cat([g.reshape(batch, -1) for g in grads.values()], dim=1).norm(dim=1)
    clip = max(float(norms.median()), 1e-3)
    expected = clipped_sums(grads, [list(grads)], threshold_of=lambda _: clip)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model, optimizer, loader = dpfused.PrivacyEngine().make_private(
        module=model, optimizer=optimizer, noise_multiplier=0.0, max_grad_norm=clip,
        data_loader=DataLoader(TensorDataset(*inputs), batch_size=batch), clipping=clipping,
        loss_reduction="sum", sampling="cyclic")
    try:
        (seen,) = [tuple(b) for b in loader]
        assert all(torch.equal(s, x) for s, x in zip(seen, inputs)), "the loader reordered"
        optimizer.zero_grad()
        loss(model(*seen)).backward()
        optimizer.step()
        for name, p in model.named_parameters():
            _assert_close(f"{clipping} released {name}", p.grad, expected[name])
        return explained_path(model, "layer")
    finally:
        detach(model)


def explained_path(model: nn.Module, layer: str) -> str:
    """The ``norm path`` cell of ``dpfused.explain(model)``'s row for ``layer``."""
    header, _, *rows = dpfused.explain(model).splitlines()
    start = header.index("norm path")
    for row in rows:
        if row.split()[0] == layer:
            return row[start:].strip()
    raise AssertionError(f"no row for {layer!r} in explain():\n{dpfused.explain(model)}")


def assert_explained(cell: str, expected: str) -> None:
    """``expected`` is among the norm paths explain() shows for the layer (a layer with a weight
    and a bias may list both, e.g. "ghost+dense")."""
    assert expected in cell, f"explain() shows {cell!r}, expected {expected!r}"
    if expected == "direct":
        assert "materialized" not in cell, f"explain() shows {cell!r}, expected {expected!r}"
