"""Embedding rule (nn.Embedding, with and without padding_idx) against the float64 oracle.

One-hot pieces take the embedding kernel whatever the mode (norm_path "embedding"); ids repeat
within an example (a small vocabulary), so the kernel must sum repeated rows before squaring.
"""

import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.rules.harness import OneLayer, released_matches_oracle, rule_pieces

SETTINGS = settings(max_examples=6, deadline=None)


@st.composite
def embedding_cases(draw):
    batch, vocab, dim = draw(st.integers(1, 4)), draw(st.integers(2, 6)), draw(st.integers(1, 5))
    positions = draw(st.sampled_from([(), (1,), (3,), (2, 3)]))
    padding_idx = draw(st.one_of(st.none(), st.integers(0, vocab - 1)))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = nn.Embedding(vocab, dim, padding_idx=padding_idx).double()
    ids = torch.randint(0, vocab, (batch, *positions), generator=g)
    if padding_idx is not None and ids.numel() > 1:
        ids.view(-1)[0] = padding_idx  # at least one padded position
    return OneLayer(layer), (ids,)


@SETTINGS
@given(embedding_cases())
def test_embedding_pieces_and_norm_path(case):
    model, inputs = case
    (piece,) = rule_pieces(model, inputs)["layer.weight"]
    assert type(piece).__name__ == "OnehotPiece"
    assert piece.padding_idx == model.layer.padding_idx
    assert piece.norm_path == "embedding"
    assert piece.compact() is piece


@SETTINGS
@given(embedding_cases(), st.sampled_from(["flat", "per_layer"]))
def test_embedding_released_gradient(case, clipping):
    """The explain() path of embeddings needs bookkeeper.py to record it: test_explain_paths.py."""
    model, inputs = case
    released_matches_oracle(model, inputs, clipping=clipping)
