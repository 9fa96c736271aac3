"""Linear rule (nn.Linear on any input rank, HuggingFace Conv1D) against the float64 oracle.

Shapes are drawn so that each norm path is taken: a factor piece's path is ghost when T = 1 or
T(d_in + d_out) < d_in d_out, direct otherwise; in flat mode a piece kept to the end of backward is
materialized when that is smaller ("direct (materialized)").
"""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.rules.harness import (OneLayer, assert_explained, factor_path, released_matches_oracle,
                                 rule_pieces)

SETTINGS = settings(max_examples=6, deadline=None)


@st.composite
def linear_shapes(draw):
    """(batch, positions, d_in, d_out, bias, path) with positions a tuple of 0-2 extra dims."""
    path = draw(st.sampled_from(["ghost", "direct"]))
    batch = draw(st.integers(1, 4))
    if path == "ghost":
        positions = draw(st.sampled_from([(), (1,), (2,)]))
        d_in, d_out = draw(st.integers(6, 9)), draw(st.integers(6, 9))
    else:
        positions = draw(st.sampled_from([(4,), (5,), (2, 3)]))
        d_in, d_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return batch, positions, d_in, d_out, draw(st.booleans())


def _case(batch, positions, d_in, d_out, bias):
    torch.manual_seed(batch * 100 + d_in * 10 + d_out)
    model = OneLayer(nn.Linear(d_in, d_out, bias=bias)).double()
    x = torch.randn(batch, *positions, d_in, dtype=torch.float64)
    seq = 1
    for p in positions:
        seq *= p
    return model, (x,), seq


@SETTINGS
@given(linear_shapes())
def test_linear_pieces_and_norm_path(shape):
    batch, positions, d_in, d_out, bias = shape
    model, inputs, seq = _case(*shape)
    pieces = rule_pieces(model, inputs)
    (weight,) = pieces["layer.weight"]
    assert type(weight).__name__ == "FactorPiece"
    assert weight.norm_path == factor_path(seq=seq, rows=d_out, cols=d_in, flat=False)
    compacted = weight.compact()
    compacted.norm_sq()
    assert compacted.norm_path == factor_path(seq=seq, rows=d_out, cols=d_in, flat=True)
    if bias:
        assert [p.norm_path for p in pieces["layer.bias"]] == ["dense"]


@SETTINGS
@given(linear_shapes(), st.sampled_from(["flat", "per_layer"]))
def test_linear_released_gradient(shape, clipping):
    batch, positions, d_in, d_out, bias = shape
    model, inputs, seq = _case(*shape)
    cell = released_matches_oracle(model, inputs, clipping=clipping)
    if clipping == "per_layer":  # flat: tests/rules/test_explain_paths.py
        assert_explained(cell, factor_path(seq=seq, rows=d_out, cols=d_in, flat=False))


transformers = pytest.importorskip("transformers")


@SETTINGS
@given(linear_shapes(), st.sampled_from(["flat", "per_layer"]))
def test_hf_conv1d(shape, clipping):
    """Conv1D stores W as (d_in, d_out): its factor piece is (input, output gradient)."""
    from transformers.pytorch_utils import Conv1D

    batch, positions, d_in, d_out, _ = shape
    torch.manual_seed(d_in * 10 + d_out)
    model = OneLayer(Conv1D(d_out, d_in)).double()
    with torch.no_grad():
        model.layer.bias.normal_()  # Conv1D starts with a zero bias
    x = torch.randn(batch, *positions, d_in, dtype=torch.float64)
    seq = x[0, ..., 0].numel()
    (weight,) = rule_pieces(model, (x,))["layer.weight"]
    assert weight.norm_path == factor_path(seq=seq, rows=d_in, cols=d_out, flat=False)
    cell = released_matches_oracle(model, (x,), clipping=clipping)
    if clipping == "per_layer":  # flat: tests/rules/test_explain_paths.py
        assert_explained(cell, factor_path(seq=seq, rows=d_in, cols=d_out, flat=False))
