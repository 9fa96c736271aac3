"""nn.MultiheadAttention rule against the float64 oracle: self-attention (one fused in_proj
linear) and cross-attention (three disjoint row blocks of in_proj_weight, no cross terms).

Every projection is a factor piece with T = sequence length: ghost for short sequences and wide
embeddings, direct for long sequences and narrow ones. The layer calls its projections twice per
forward, so even per_layer clipping completes it at the end of backward, where a piece smaller as
per-example gradients is materialized ("direct (materialized)") in every mode.
"""

import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.rules.harness import (OneLayer, assert_explained, factor_path, released_matches_oracle,
                                 rule_pieces)

SETTINGS = settings(max_examples=4, deadline=None)


def self_attention(layer, x):
    return layer(x, x, x, need_weights=False)[0]


def cross_attention(layer, q, kv):
    return layer(q, kv, kv, need_weights=False)[0]


def self_rule(rule, layer, tap, x):
    return rule.forward(layer, tap, x, x, x, need_weights=False)[0]


def cross_rule(rule, layer, tap, q, kv):
    return rule.forward(layer, tap, q, kv, kv, need_weights=False)[0]


@st.composite
def mha_cases(draw):
    path = draw(st.sampled_from(["ghost", "direct"]))
    heads = draw(st.sampled_from([1, 2]))
    if path == "ghost":
        embed, length = heads * draw(st.integers(6 // heads, 8 // heads)), draw(st.integers(1, 2))
    else:
        embed, length = heads * draw(st.integers(1, 2)), draw(st.integers(9, 11))
    batch, bias, cross = draw(st.integers(1, 3)), draw(st.booleans()), draw(st.booleans())
    torch.manual_seed(draw(st.integers(0, 2**16)))
    layer = nn.MultiheadAttention(embed, heads, bias=bias, batch_first=True).double()
    x = torch.randn(batch, length, embed, dtype=torch.float64)
    if cross:
        kv = torch.randn(batch, length, embed, dtype=torch.float64)
        return OneLayer(layer, cross_attention), (x, kv), cross_rule, length, embed
    return OneLayer(layer, self_attention), (x,), self_rule, length, embed


@SETTINGS
@given(mha_cases())
def test_mha_pieces_and_norm_path(case):
    model, inputs, rule_call, length, embed = case
    pieces = rule_pieces(model, inputs, rule_call=rule_call)
    in_proj, out_proj = pieces["layer.in_proj_weight"], pieces["layer.out_proj.weight"]
    assert len(in_proj) == len(inputs) * 2 - 1  # 1 fused (self) or 3 row blocks (cross)
    rows = 3 * embed if len(in_proj) == 1 else embed
    assert {p.norm_path for p in in_proj} == {factor_path(seq=length, rows=rows, cols=embed,
                                                          flat=False)}
    assert out_proj[0].norm_path == factor_path(seq=length, rows=embed, cols=embed, flat=False)


@SETTINGS
@given(mha_cases(), st.sampled_from(["flat", "per_layer"]))
def test_mha_released_gradient(case, clipping):
    model, inputs, _, length, embed = case
    cell = released_matches_oracle(model, inputs, clipping=clipping)
    expected = factor_path(seq=length, rows=embed, cols=embed, flat=True)
    if expected == "ghost":  # materialized pieces: tests/rules/test_explain_paths.py
        assert_explained(cell, expected)
