"""Shape helpers shared by the rules: batch-major views of activations and gradients."""

from __future__ import annotations

import math

import torch


def batch_major(t: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """``t`` with the batch dimension first (``batch_first=False`` puts it at dim 1, as in Opacus)."""
    if batch_first or t.dim() < 3:
        return t
    return t.movedim(1, 0)


def as_sequence(t: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """(B, T, d): every position between batch and features folded into T (T = 1 for 2-D input)."""
    t = batch_major(t, batch_first)
    if t.dim() == 1:
        raise ValueError(
            f"an input of shape {tuple(t.shape)} has no batch dimension; dpfused needs batched "
            "inputs (B, ..., features)"
        )
    positions = math.prod(t.shape[1:-1])  # explicit: -1 is ambiguous for an empty batch
    return t.reshape(t.shape[0], positions, t.shape[-1])
