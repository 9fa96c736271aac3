"""nn.MultiheadAttention: its raw in_proj_weight and out_proj are linears (docs/design.md §3).

Pieces (through ``linear_use``): in_proj_weight and out_proj.weight -> ``FactorPiece`` (row blocks
for cross-attention), biases -> ``DensePiece``. Kernels reached: as for nn.Linear,
``kernels.choose_norm_path`` then ``ghost_norm_sq`` or ``direct_norm_sq`` (norm_path "ghost" /
"direct"), ``clipped_weight_grad``; flat book-keeping may materialize a factor piece
(norm_path "direct (materialized)").

The forward is re-expressed with ``linear_use`` so the projections deliver FactorPieces: self-
attention (query is key is value) is one linear on the fused (3E, E) weight; cross-attention uses
three row blocks of it (disjoint rows: no cross terms). out_proj's parameters are used directly by
PyTorch's MHA, never through out_proj's forward, so this rule claims them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpfused.rules import BaseRule, register
from dpfused.rules.linear import linear_use


class _BatchFirstTap:
    """The rule works on (N, L, E) tensors whatever the model's layout."""

    batch_first = True

    def __init__(self, tap):
        self._tap = tap

    def record_forward(self, batch=None):
        self._tap.record_forward(batch)

    @property
    def forward_batch(self):
        return self._tap.forward_batch

    def deliver(self, pieces):
        self._tap.deliver(pieces)


@register(nn.MultiheadAttention)
class MultiheadAttentionRule(BaseRule):
    name = "multihead_attention"
    claims_children = True

    def check(self, module, path):
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError(
                f"module '{path}' (MultiheadAttention) uses add_bias_kv/add_zero_attn, which "
                "dpfused does not support yet; construct it with add_bias_kv=False, add_zero_attn=False"
            )
        if not module._qkv_same_embed_dim:
            raise ValueError(
                f"module '{path}' (MultiheadAttention) has kdim/vdim different from embed_dim; "
                "dpfused supports the fused in_proj_weight form only (kdim = vdim = embed_dim)"
            )

    def forward(self, module, tap, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if query.dim() != 3:
            raise ValueError(
                f"MultiheadAttention got an unbatched query of shape {tuple(query.shape)}; "
                "dpfused needs batched inputs"
            )
        tap = _BatchFirstTap(tap)
        self_attention = query is key and key is value
        if not module.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = _project_in(module, tap, query, key, value, self_attention)
        mask = _additive_mask(module, attn_mask, key_padding_mask, is_causal, q, k)
        out, weights = _attend(module, q, k, v, mask)
        out = linear_use(out, module.out_proj.weight, module.out_proj.bias, tap=tap)
        if not module.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_attn_weights else weights


def _project_in(module, tap, query, key, value, self_attention):
    weight, bias, embed = module.in_proj_weight, module.in_proj_bias, module.embed_dim
    if self_attention:
        return linear_use(query, weight, bias, tap=tap).chunk(3, dim=-1)
    return tuple(
        linear_use(x, weight, bias, tap=tap, rows=slice(i * embed, (i + 1) * embed))
        for i, x in enumerate((query, key, value))
    )


def _heads(x, num_heads):  # (N, L, E) -> (N, H, L, E/H)
    batch, length, embed = x.shape
    return x.reshape(batch, length, num_heads, embed // num_heads).transpose(1, 2)


def _additive_mask(module, attn_mask, key_padding_mask, is_causal, q, k):
    batch, length, source = q.shape[0], q.shape[1], k.shape[1]
    heads = module.num_heads
    mask = torch.zeros(batch, heads, length, source, dtype=q.dtype, device=q.device)
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1)
    if attn_mask is not None:
        attn_mask = _as_additive(attn_mask, q.dtype)
        if attn_mask.dim() == 3:  # (N*H, L, S)
            attn_mask = attn_mask.reshape(batch, heads, length, source)
        mask = mask + attn_mask
    if key_padding_mask is not None:
        mask = mask + _as_additive(key_padding_mask, q.dtype)[:, None, None, :]
    return mask


def _as_additive(mask, dtype):
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _attend(module, q, k, v, mask):
    heads = module.num_heads
    q, k, v = _heads(q, heads), _heads(k, heads), _heads(v, heads)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + mask  # (N, H, L, S)
    weights = torch.softmax(scores, dim=-1)
    dropped = F.dropout(weights, p=module.dropout, training=module.training)
    out = (dropped @ v).transpose(1, 2)  # (N, L, H, E/H)
    return out.reshape(out.shape[0], out.shape[1], q.shape[1] * q.shape[3]), weights
