"""Losses whose per-example gradients depend on that example alone.

HuggingFace's causal-LM loss averages over every non-ignored token of the batch. The divisor then
depends on the other examples' lengths, so adding or removing one example rescales every other
example's gradient and the clipping bound no longer bounds the sensitivity (docs/design.md §3). The loss here
averages over each example's own tokens first, then sums or averages over examples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["per_example_lm_loss"]


def per_example_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    shift: bool = True,
) -> torch.Tensor:
    """Causal language-model loss averaged over each example's own tokens.

    Args:
        logits: ``(B, T, V)`` scores.
        labels: ``(B, T)`` token ids; positions equal to ``ignore_index`` do not count.
        ignore_index: label value that marks padding.
        reduction: ``"mean"`` (over examples; pair with ``loss_reduction="mean"``), ``"sum"`` (pair
            with ``loss_reduction="sum"``) or ``"none"`` (one loss per example, shape ``(B,)``).
        shift: predict token ``t+1`` from position ``t`` (the HuggingFace convention when labels
            are the input ids). Set False when labels are already shifted.

    Returns:
        The loss: a scalar, or ``(B,)`` with ``reduction="none"``. An example with no counted token
        contributes 0.

    Raises:
        ValueError: shapes that do not line up, or an unknown ``reduction``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r} is not one of 'mean', 'sum', 'none'")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"per_example_lm_loss expects logits (B, T, V) and labels (B, T); got logits "
            f"{tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    if shift:
        # Shift the labels, not the logits: slicing the logits would cost a full-size copy and a
        # zero-filled gradient in backward. The last position predicts nothing.
        labels = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    batch, seq, vocab = logits.shape
    flat = logits.reshape(batch * seq, vocab)
    if flat.dtype != torch.float64:  # bf16/fp16 logits: the softmax in float32
        flat = flat.float()
    token_loss = F.cross_entropy(
        flat, labels.reshape(batch * seq),
        ignore_index=ignore_index, reduction="none",
    ).view(batch, seq)
    counted = (labels != ignore_index).sum(dim=1)  # (B,)
    example_loss = token_loss.sum(dim=1) / counted.clamp(min=1)  # (B,)
    if reduction == "none":
        return example_loss
    if reduction == "sum":
        return example_loss.sum()
    return example_loss.mean() if example_loss.numel() else example_loss.sum()
