"""The privacy-critical arithmetic of DP-SGD, written once (DESIGN §3-§5).

Every path that clips, scales or noises a gradient calls these functions; nothing else in dpfused
computes a clip factor, a sensitivity, a noise standard deviation or the final normalization.

    per example i, group g:  c_ig = min(1, C_g / (||G_ig|| + 1e-6))
    sensitivity:             C = sqrt(sum_g C_g^2)          (add/remove adjacency)
    final gradient:          (sum_i c_ig G_ig + N(0, sigma^2 C^2 I)) / B_norm
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "CLIP_EPS",
    "clip_factors",
    "example_multipliers",
    "default_group_thresholds",
    "sensitivity",
    "noise_std",
    "noise_std_on_rank",
    "gradient_normalizer",
    "noised_gradient",
]

# Added to the norm before dividing, as in Opacus and DESIGN §4: keeps c <= 1 without a branch and
# keeps ||c_i G_i|| <= C_g even when the norm rounds.
CLIP_EPS = 1e-6


def clip_factors(norm_sq: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per-example clip factors ``min(1, C / (||G_i|| + 1e-6))`` from squared norms ``(B,)``."""
    norms = _accumulation(norm_sq).clamp_min(0).sqrt()
    return (threshold / (norms + CLIP_EPS)).clamp(max=1.0)


def example_multipliers(norm_sq: torch.Tensor, threshold: float, loss_scale: float) -> torch.Tensor:
    """What each example's raw per-example gradient is multiplied by before summing.

    The layer rules see the gradient of the loss the user backpropagates; with a mean loss over B
    examples that is G_i / B. ``loss_scale`` (B for "mean", 1 for "sum") restores G_i; the clip
    factor is computed on the restored norm.

    Args:
        norm_sq: squared norms of the raw (loss-scaled) per-example gradients, ``(B,)``.
        threshold: the group's clipping threshold C_g.
        loss_scale: factor from the raw gradient to the true per-example gradient.

    Returns:
        ``(B,)`` float32 (float64 for float64 norms) tensor ``c_i * loss_scale``.
    """
    true_norm_sq = _accumulation(norm_sq) * (loss_scale * loss_scale)
    return clip_factors(true_norm_sq, threshold) * loss_scale


def _accumulation(t: torch.Tensor) -> torch.Tensor:
    """float32 at least (norms of bf16/fp16 models), float64 kept (the float64 oracle tests)."""
    return t if t.dtype == torch.float64 else t.to(torch.float32)


def default_group_thresholds(max_grad_norm: float, num_groups: int) -> list[float]:
    """C_g = C / sqrt(K): the total sensitivity stays ``max_grad_norm``."""
    return [max_grad_norm / math.sqrt(num_groups)] * num_groups


def sensitivity(thresholds: Sequence[float]) -> float:
    """L2 sensitivity of the concatenated clipped sum under add/remove: sqrt(sum C_g^2)."""
    return math.sqrt(sum(float(c) * float(c) for c in thresholds))


def noise_std(noise_multiplier: float, thresholds: Sequence[float]) -> float:
    """Standard deviation of the Gaussian noise on every coordinate: sigma * C."""
    return noise_multiplier * sensitivity(thresholds)


def noise_std_on_rank(std: float, *, rank: int) -> float:
    """Data parallel: rank 0 adds all the noise; the all-reduced sum then carries it exactly once.

    Every other rank contributes only its clipped sums (DESIGN §5).
    """
    return std if rank == 0 else 0.0


def gradient_normalizer(
    *, loss_reduction: str, expected_batch_size: float
) -> float:
    """B_norm of DESIGN §5: the expected logical batch size, or 1 for a summed loss.

    Dividing by the *expected* size (q N under Poisson), never by the realized one, keeps the
    normalization data-independent: the realized size of a Poisson batch is private.
    """
    if loss_reduction == "sum":
        return 1.0
    if expected_batch_size <= 0:
        raise ValueError(f"expected batch size must be positive, got {expected_batch_size}")
    return float(expected_batch_size)


def noised_gradient(
    clipped_sum: torch.Tensor | None,
    *,
    shape: torch.Size,
    std: float,
    normalizer: float,
    device: torch.device,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(clipped sum + N(0, std^2)) / B_norm, in float32.

    ``clipped_sum`` may be None: no example touched this parameter (an empty batch, or a layer
    unused by this batch); the step still carries the noise.
    """
    noise = torch.normal(
        mean=0.0, std=std, size=tuple(shape), device=device, generator=generator,
        dtype=torch.float32,
    )
    if clipped_sum is not None:
        noise.add_(clipped_sum.to(torch.float32))
    return noise.div_(normalizer)
