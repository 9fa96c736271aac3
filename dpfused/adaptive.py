"""Adaptive clipping thresholds (docs/design.md §4; Andrew et al. 2021; He et al. 2022).

Each step releases, per clipping group, a noisy count of the examples the group did not clip,
and moves the group's threshold toward the ``target_quantile`` of the per-example norms:

    b_g = (sum_i (1[||G_ig|| <= C_g] - 1/2) + N(0, sigma_b^2)) / B + 1/2
    C_g <- C_g exp(-learning_rate (b_g - target_quantile))

- ``per_layer`` / ``per_device``: then all C_g are rescaled so that sqrt(sum C_g^2) stays
  ``max_grad_norm``: the sensitivity and the noise std are unchanged, the budget moves to the
  groups whose gradients are large (He et al.'s adaptive group-wise clipping).
- ``flat``: the one threshold moves (Andrew et al.), clamped to [min_threshold, max_threshold];
  the noise std sigma * C follows it.

The counts are a second Gaussian query on the same batch; the accountant records
sigma_eff with 1/sigma_eff^2 = 1/sigma^2 + K/(4 sigma_b^2) (``privacy_math``). ``noise_multiplier``
given to ``make_private`` is the gradient's sigma; ``make_private_with_epsilon`` calibrates
sigma_eff and solves for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpfused.arguments import check_number

__all__ = ["AdaptiveClipping"]


@dataclass(frozen=True, kw_only=True)
class AdaptiveClipping:
    """How clipping thresholds adapt; pass it as ``make_private(adaptive_clipping=...)``.

    Args:
        count_noise_std: sigma_b, the std of the Gaussian noise on each group's count (in
            examples). No default: it is a privacy parameter. Andrew et al. suggest about
            batch_size / 20; the privacy cost grows with the number of groups K.
        target_quantile: the fraction of examples each group should leave unclipped.
        learning_rate: eta of the geometric update.
        min_threshold, max_threshold: ``flat`` only: bounds on the moving clipping norm.

    Raises:
        ValueError: a value out of range, naming the field.
    """

    count_noise_std: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    min_threshold: float | None = None
    max_threshold: float | None = None

    def __post_init__(self):
        _check_positive("count_noise_std", self.count_noise_std)
        _check_positive("learning_rate", self.learning_rate)
        check_number("AdaptiveClipping: target_quantile", self.target_quantile, "in (0, 1)",
                     lambda v: 0 < v < 1)
        for name in ("min_threshold", "max_threshold"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        if (self.min_threshold is not None and self.max_threshold is not None
                and not self.min_threshold < self.max_threshold):
            raise ValueError(f"AdaptiveClipping: min_threshold ({self.min_threshold}) must be below "
                             f"max_threshold ({self.max_threshold})")

    def check_clipping(self, clipping: str) -> None:
        """Bounds apply to the moving flat norm only; group-wise thresholds keep their total."""
        if clipping != "flat" and (self.min_threshold is not None or self.max_threshold is not None):
            raise ValueError(
                f"AdaptiveClipping: min_threshold/max_threshold apply to clipping='flat' only; with "
                f"clipping={clipping!r} the thresholds are rescaled to keep sqrt(sum C_g^2) = "
                "max_grad_norm. Drop them"
            )


def _check_positive(name: str, value) -> None:
    check_number(f"AdaptiveClipping: {name}", value, "a finite number > 0",
                 lambda v: math.isfinite(v) and v > 0)
