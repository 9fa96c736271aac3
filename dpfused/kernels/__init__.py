"""Triton kernels and their torch reference twins. Knows nothing of privacy."""

# Every op takes `impl="auto" | "triton" | "torch"`; see dispatch.resolve_impl. Importing this
# package runs no kernel and needs no GPU; without the triton package "auto" picks torch.
from .chacha20 import chacha20_blocks
from .clipped_grad import (choose_clipped_grad_variant, clipped_weight_grad,
                           clipped_weight_grad_scale_matmul)
from .direct_norm import direct_norm_sq
from .dispatch import choose_norm_path, resolve_impl, triton_available
from .embedding_norm import embedding_clipped_grad, embedding_dense_inner, embedding_norm_sq
from .ghost_norm import ghost_inner, ghost_norm_sq, ghost_norm_sq_with_bias
from .norm_layers import norm_layer_backward

__all__ = [
    "chacha20_blocks",
    "choose_clipped_grad_variant",
    "choose_norm_path",
    "clipped_weight_grad",
    "clipped_weight_grad_scale_matmul",
    "direct_norm_sq",
    "embedding_clipped_grad",
    "embedding_dense_inner",
    "embedding_norm_sq",
    "ghost_inner",
    "ghost_norm_sq",
    "ghost_norm_sq_with_bias",
    "norm_layer_backward",
    "resolve_impl",
    "triton_available",
]
