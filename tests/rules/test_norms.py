"""Norm-layer rules (nn.LayerNorm, nn.RMSNorm; nn.GroupNorm via torch.func) against the oracle.

Their per-example gradients are small: every piece is dense (norm_path "dense") in every mode.
"""

import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.rules.harness import OneLayer, released_matches_oracle, rule_pieces

SETTINGS = settings(max_examples=5, deadline=None)


@st.composite
def norm_cases(draw):
    kind = draw(st.sampled_from(["layer_norm", "rms_norm", "group_norm"]))
    batch, affine = draw(st.integers(1, 4)), draw(st.booleans())
    torch.manual_seed(draw(st.integers(0, 2**16)))
    if kind == "group_norm":
        groups, per_group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        layer = nn.GroupNorm(groups, groups * per_group, affine=True)
        x = torch.randn(batch, groups * per_group, draw(st.integers(2, 4)), dtype=torch.float64)
    else:
        positions = draw(st.sampled_from([(), (3,), (2, 2)]))
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
        if kind == "layer_norm":
            layer = nn.LayerNorm(shape, elementwise_affine=affine, bias=draw(st.booleans()))
        else:
            layer = nn.RMSNorm(shape, elementwise_affine=affine)
        x = torch.randn(batch, *positions, *shape, dtype=torch.float64)
    layer = layer.double()
    with torch.no_grad():  # not the identity at initialization
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return kind, OneLayer(layer), (x,)


@SETTINGS
@given(norm_cases())
def test_norm_pieces_and_norm_path(case):
    kind, model, inputs = case
    if not any(p.requires_grad for p in model.parameters()):
        return  # elementwise_affine=False: nothing to clip
    pieces = rule_pieces(model, inputs)
    assert all(type(p).__name__ == "DensePiece" for ps in pieces.values() for p in ps)
    assert {p.norm_path for ps in pieces.values() for p in ps} == {"dense"}


@SETTINGS
@given(norm_cases(), st.sampled_from(["flat", "per_layer"]))
def test_norm_released_gradient(case, clipping):
    """The explain() path of norm layers needs bookkeeper.py to record it: test_explain_paths.py."""
    kind, model, inputs = case
    if not any(p.requires_grad for p in model.parameters()):
        return
    released_matches_oracle(model, inputs, clipping=clipping)


def test_rules_are_the_documented_ones():
    from dpfused.rules import rule_for

    assert rule_for(nn.LayerNorm(3)).name == "layer_norm"
    assert rule_for(nn.RMSNorm(3)).name == "rms_norm"
    assert rule_for(nn.GroupNorm(1, 3)).name == "functorch"
