"""The torch.func fallback rule (modules with parameters and no dedicated rule) against the oracle.

Its pieces are the per-example gradients themselves (norm_path "dense") in every mode.
"""

import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.rules.harness import OneLayer, released_matches_oracle, rule_pieces

SETTINGS = settings(max_examples=5, deadline=None)


class ScaleShift(nn.Module):
    """A custom layer no rule knows: y = tanh(x * scale + shift) @ mix."""

    def __init__(self, dim, out):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(dim))
        self.shift = nn.Parameter(torch.randn(dim))
        self.mix = nn.Parameter(torch.randn(dim, out))

    def forward(self, x):
        return torch.tanh(x * self.scale + self.shift) @ self.mix


@st.composite
def fallback_cases(draw):
    batch, dim, out = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    positions = draw(st.sampled_from([(), (2,), (2, 3)]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = OneLayer(ScaleShift(dim, out)).double()
    return model, (torch.randn(batch, *positions, dim, dtype=torch.float64),)


@SETTINGS
@given(fallback_cases())
def test_fallback_pieces_and_norm_path(case):
    model, inputs = case
    pieces = rule_pieces(model, inputs)
    assert set(pieces) == {"layer.scale", "layer.shift", "layer.mix"}
    assert {p.norm_path for ps in pieces.values() for p in ps} == {"dense"}


@SETTINGS
@given(fallback_cases(), st.sampled_from(["flat", "per_layer"]))
def test_fallback_released_gradient(case, clipping):
    """The explain() path needs bookkeeper.py to record it: tests/rules/test_explain_paths.py."""
    model, inputs = case
    released_matches_oracle(model, inputs, clipping=clipping)


def test_unknown_module_gets_the_fallback():
    from dpfused.rules import fallback_rule, rule_for

    assert rule_for(ScaleShift(2, 2)) is None and fallback_rule().name == "functorch"


def test_a_parameter_argument_is_never_split_per_example():
    """A (B, ...)-shaped parameter handed to a module is shared by every example, also when the
    batch happens to have B examples; a tensor of that shape is per example."""
    from dpfused.rules.functorch import _per_example

    batch = 4
    assert not _per_example(nn.Parameter(torch.randn(batch, 3)), batch)
    assert _per_example(torch.randn(batch, 3), batch)
    assert not _per_example(torch.randn(3, batch), batch)
