"""Convolution rule (nn.Conv1d/2d/3d, groups, every padding mode) against the float64 oracle.

A convolution is a linear map on unfolded patches: T = output positions, rows = C_out / groups,
cols = (C_in / groups) * kernel volume, one factor piece per group. Kernels and channel counts
are drawn small (ghost: few positions, many columns) or large in positions (direct).
"""

import math

import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.rules.harness import (OneLayer, assert_explained, factor_path, released_matches_oracle,
                                 rule_pieces)

SETTINGS = settings(max_examples=6, deadline=None)
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@st.composite
def conv_cases(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2]))
    c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    size = draw(st.integers(kernel, kernel + (4 if dims < 3 else 2)))
    padding = draw(st.integers(0, min(1, size - 1)))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    stride = draw(st.integers(1, 2))
    bias = draw(st.booleans())
    batch = draw(st.integers(1, 3))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    layer = CONV[dims](c_in, c_out, kernel, stride=stride, padding=padding, groups=groups,
                       bias=bias, padding_mode=mode).double()
    x = torch.randn(batch, c_in, *([size] * dims), dtype=torch.float64)
    return OneLayer(layer), (x,)


def _expected_path(model, x, *, flat):
    layer = model.layer
    with torch.no_grad():
        out = layer(x)
    seq = math.prod(out.shape[2:])
    rows = layer.out_channels // layer.groups
    cols = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
    return factor_path(seq=seq, rows=rows, cols=cols, flat=flat)


@SETTINGS
@given(conv_cases())
def test_conv_pieces_and_norm_path(case):
    model, inputs = case
    pieces = rule_pieces(model, inputs)
    weight = pieces["layer.weight"]
    assert len(weight) == model.layer.groups
    expected = _expected_path(model, *inputs, flat=False)
    assert [p.norm_path for p in weight] == [expected] * model.layer.groups
    compacted = [p.compact() for p in weight]
    for p in compacted:
        p.norm_sq()
    flat = _expected_path(model, *inputs, flat=True)
    assert [p.norm_path for p in compacted] == [flat] * model.layer.groups


@SETTINGS
@given(conv_cases(), st.sampled_from(["flat", "per_layer"]))
def test_conv_released_gradient(case, clipping):
    model, inputs = case
    expected = _expected_path(model, *inputs, flat=False)
    cell = released_matches_oracle(model, inputs, clipping=clipping)
    if clipping == "per_layer":  # flat: tests/rules/test_explain_paths.py
        assert_explained(cell, expected)


def test_both_paths_are_drawn():
    """The strategy reaches ghost and direct (hypothesis alone might not, with few examples)."""
    ghost = OneLayer(nn.Conv2d(2, 4, 3).double()), (torch.randn(2, 2, 3, 3, dtype=torch.float64),)
    direct = OneLayer(nn.Conv1d(1, 1, 1).double()), (torch.randn(2, 1, 6, dtype=torch.float64),)
    assert _expected_path(*ghost[0:1], *ghost[1], flat=False) == "ghost"
    assert _expected_path(*direct[0:1], *direct[1], flat=False) == "direct"
    for model, inputs, path in ((*ghost, "ghost"), (*direct, "direct")):
        assert {p.norm_path for p in rule_pieces(model, inputs)["layer.weight"]} == {path}
        assert_explained(released_matches_oracle(model, inputs, clipping="per_layer"), path)
