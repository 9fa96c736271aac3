"""``dpfused.explain(model)`` shows the norm path of every layer in every clipping mode (issue 9).

The layer's path comes from its pieces' ``norm_path`` (dpfused.pieces): "ghost" / "direct" for
factor pieces, "direct (materialized)" once flat book-keeping compacted them, "embedding" for
one-hot pieces, "dense" for dense ones. A layer with a weight and a bias may list both.
"""

import pytest
import torch
import torch.nn as nn

from tests.rules.harness import OneLayer, assert_explained, released_matches_oracle
from tests.rules.test_functorch import ScaleShift


def _linear(seq, d_in, d_out):
    torch.manual_seed(0)
    return OneLayer(nn.Linear(d_in, d_out).double()), (
        torch.randn(3, seq, d_in, dtype=torch.float64),)


CASES = {
    # name: (model and inputs, {mode: path})
    "linear_ghost": (lambda: _linear(1, 8, 8), {"per_layer": "ghost", "flat": "ghost"}),
    "linear_direct": (lambda: _linear(6, 2, 2),
                      {"per_layer": "direct", "flat": "direct (materialized)"}),
    "conv_direct": (lambda: (OneLayer(nn.Conv1d(1, 2, 2).double()),
                             (torch.randn(3, 1, 9, dtype=torch.float64),)),
                    {"per_layer": "direct", "flat": "direct (materialized)"}),
    "embedding": (lambda: (OneLayer(nn.Embedding(5, 3, padding_idx=0).double()),
                           (torch.randint(0, 5, (3, 4)),)),
                  {"per_layer": "embedding", "flat": "embedding"}),
    "layer_norm": (lambda: (OneLayer(nn.LayerNorm(4).double()),
                            (torch.randn(3, 2, 4, dtype=torch.float64),)),
                   {"per_layer": "dense", "flat": "dense"}),
    "functorch": (lambda: (OneLayer(ScaleShift(3, 2).double()),
                           (torch.randn(3, 3, dtype=torch.float64),)),
                  {"per_layer": "dense", "flat": "dense"}),
}


@pytest.mark.parametrize("clipping", ["per_layer", "flat"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_explain_shows_the_norm_path(name, clipping):
    build, paths = CASES[name]
    model, inputs = build()
    assert_explained(released_matches_oracle(model, inputs, clipping=clipping), paths[clipping])
