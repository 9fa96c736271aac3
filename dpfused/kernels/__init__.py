"""Triton kernels and their torch reference twins. Knows nothing of privacy.

The Triton ops take `impl="auto" | "triton" | "torch"`; see dispatch.resolve_impl. Importing this
package runs no kernel and needs no GPU; without the triton package "auto" picks torch. The
embedding ops are torch on every device (embedding_norm.py says why). Every op that feeds a clip
factor comes in a `_bounded` form returning an `Estimate`: the value and a rigorous bound on its
floating-point error (docs/design.md §3, "Floating point").
"""

from ._checks import (Estimate, FactorNorms, exact_fp32_matmul, factor_norms, gamma, row_norms,
                      unit_roundoff)
from .chacha20 import chacha20_blocks
from .clipped_grad import add_examples_float64, clipped_weight_grad, split_scale
from .direct_norm import direct_norm_sq, direct_norm_sq_bounded
from .dispatch import choose_norm_path, resolve_impl, triton_available
from .embedding_norm import (EmbeddingGroups, embedding_clipped_grad,
                             embedding_dense_inner_bounded, embedding_groups, embedding_norm_sq,
                             groups_clipped_grad, groups_norm_sq)
from .ghost_norm import (ghost_inner, ghost_inner_bounded, ghost_norm_sq, ghost_norm_sq_bounded,
                         magnitude)
from .norm_layers import norm_layer_backward

__all__ = [
    "EmbeddingGroups",
    "Estimate",
    "FactorNorms",
    "chacha20_blocks",
    "choose_norm_path",
    "add_examples_float64",
    "clipped_weight_grad",
    "direct_norm_sq",
    "direct_norm_sq_bounded",
    "embedding_clipped_grad",
    "embedding_dense_inner_bounded",
    "embedding_groups",
    "embedding_norm_sq",
    "exact_fp32_matmul",
    "factor_norms",
    "gamma",
    "ghost_inner",
    "ghost_inner_bounded",
    "ghost_norm_sq",
    "ghost_norm_sq_bounded",
    "groups_clipped_grad",
    "groups_norm_sq",
    "magnitude",
    "norm_layer_backward",
    "resolve_impl",
    "row_norms",
    "split_scale",
    "triton_available",
    "unit_roundoff",
]
