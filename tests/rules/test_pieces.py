"""Piece forms own their operations and record the norm path (issue 9; docs/design.md §3-4).

The module-level functions stay one-line delegates; ``norm_path`` is set by ``norm_sq`` for every
form, including a factor piece that ``compact`` materialized (flat book-keeping).
"""

import torch

from dpfused import pieces as P

B, T = 3, 5


def _param(rows=6, cols=4):
    return torch.nn.Parameter(torch.randn(rows, cols, dtype=torch.float64))


def _factor(param, seq, rows=None):
    m = param.shape[0] if rows is None else rows.stop - rows.start
    return P.FactorPiece(param, left=torch.randn(B, seq, m, dtype=torch.float64),
                         right=torch.randn(B, seq, param.shape[1], dtype=torch.float64), rows=rows)


def test_norm_path_of_every_form():
    param = _param()
    ghost, direct = _factor(param, 1), _factor(param, 40)
    onehot = P.OnehotPiece(param, ids=torch.randint(0, 6, (B, T)),
                           grad=torch.randn(B, T, 4, dtype=torch.float64), padding_idx=0)
    dense = P.DensePiece(param, torch.randn(B, 6, 4, dtype=torch.float64))
    pieces = [ghost, direct, onehot, dense]
    assert [p.norm_path for p in pieces] == ["", "", "", ""]  # not computed yet
    for p in pieces:
        p.norm_sq()
    assert [p.norm_path for p in pieces] == ["ghost", "direct", "embedding", "dense"]
    assert set(P.NORM_PATHS) >= {p.norm_path for p in pieces}


def test_compacted_factor_piece_says_it_was_materialized():
    param = _param()
    kept, materialized = _factor(param, 1).compact(), _factor(param, 40).compact()
    assert isinstance(kept, P.FactorPiece)
    assert isinstance(materialized, P.DensePiece) and materialized.materialized
    kept.norm_sq()
    materialized.norm_sq()
    assert (kept.norm_path, materialized.norm_path) == ("ghost", "direct (materialized)")


def test_inner_is_symmetric_whichever_form_it_is_called_on():
    param = _param()
    p, q = _factor(param, T), _factor(param, T, rows=slice(1, 3))
    onehot = P.OnehotPiece(param, ids=torch.randint(0, 6, (B, T)),
                           grad=torch.randn(B, T, 4, dtype=torch.float64))
    for piece in (p, q, onehot, P.DensePiece(param, p.materialize())):
        for other in (p, q, onehot):
            torch.testing.assert_close(piece.inner(other), other.inner(piece), rtol=1e-12, atol=0)


def test_empty_batch_computes_no_path():
    param = _param()
    empty = P.FactorPiece(param, left=torch.zeros(0, T, 6, dtype=torch.float64),
                          right=torch.zeros(0, T, 4, dtype=torch.float64))
    assert empty.norm_sq().shape == (0,) and empty.norm_path == ""
    assert empty.compact() is empty
