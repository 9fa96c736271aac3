"""nn.Embedding: G_i = sum_t onehot(x_{i,t}) (x) g_{i,t}; positions holding padding_idx add nothing.

Pieces: weight -> ``OnehotPiece``. Kernels reached: ``kernels.embedding_norm_sq`` (norm_path
"embedding"), ``embedding_dense_inner`` when tied to a linear head, ``embedding_clipped_grad``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpfused.pieces import OnehotPiece
from dpfused.rules import BaseRule, register
from dpfused.rules._shape import batch_major


class _EmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, tap, padding_idx):
        ctx.save_for_backward(ids)
        ctx.weight, ctx.tap, ctx.padding_idx = weight, tap, padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        batch_first = ctx.tap.batch_first
        if ids.dim() < 2:  # (B,) lookups: one position per example
            ids_b = ids.unsqueeze(1)
        else:  # ids are (B, T, ...) or, sequence-first, (T, B, ...)
            ids_b = ids if batch_first else ids.movedim(1, 0)
        grad_b = batch_major(grad_out, batch_first)
        batch, dim = ids_b.shape[0], grad_out.shape[-1]
        positions = math.prod(ids_b.shape[1:])  # explicit: -1 is ambiguous for an empty batch
        piece = OnehotPiece(
            ctx.weight,
            ids=ids_b.reshape(batch, positions),
            grad=grad_b.reshape(batch, positions, dim),
            padding_idx=ctx.padding_idx,
        )
        ctx.tap.deliver([piece])
        return None, None, None, None


@register(nn.Embedding)
class EmbeddingRule(BaseRule):
    name = "embedding"
    def check(self, module, path):
        if module.max_norm is not None:
            raise ValueError(
                f"module '{path}' (Embedding) has max_norm={module.max_norm}: the lookup renormalizes "
                "rows in place, a data-dependent change outside the DP mechanism; set max_norm=None"
            )
        if module.scale_grad_by_freq:
            raise ValueError(
                f"module '{path}' (Embedding) has scale_grad_by_freq=True, which scales each example's "
                "gradient by counts over the whole batch (examples mix); set scale_grad_by_freq=False"
            )
        if module.sparse:
            raise ValueError(
                f"module '{path}' (Embedding) has sparse=True; dpfused produces dense noised gradients "
                "(noise touches every row); set sparse=False and use a dense optimizer"
            )

    def forward(self, module, tap, ids):
        ids = _expand_broadcast(ids, tap)
        tap.record_forward(_batch_of(ids, tap.batch_first))
        return _EmbeddingFunction.apply(ids, module.weight, tap, module.padding_idx)


def _batch_of(ids, batch_first):
    if ids.dim() < 2:
        return ids.shape[0] if ids.dim() == 1 else None
    return ids.shape[0] if batch_first else ids.shape[1]


def _expand_broadcast(ids, tap):
    """Expand a lookup shared by the whole batch (HuggingFace's position_ids of shape (1, T)).

    Its output would be broadcast over the batch, and autograd would sum the examples' gradients
    before this layer's backward: per-example gradients lost. Expanded to the batch size seen by
    the earlier layers of this forward, the output has the same values after broadcasting and each
    example's gradient arrives separately.
    """
    batch = tap.forward_batch
    if ids.dim() < 2 or batch is None or _batch_of(ids, tap.batch_first) != 1:
        return ids
    if tap.batch_first:
        return ids.expand(batch, *ids.shape[1:])
    return ids.expand(ids.shape[0], batch, *ids.shape[2:])
