"""Opacus' ``get_noise_multiplier`` over the accountants of this package, with Opacus' search."""

from __future__ import annotations

from dpfused.accountants.registry import create_accountant

__all__ = ["get_noise_multiplier"]

MAX_SIGMA = 1e6


def get_noise_multiplier(*, target_epsilon: float, target_delta: float, sample_rate: float,
                         epochs: int | None = None, steps: int | None = None,
                         accountant: str = "rdp", epsilon_tolerance: float = 0.01,
                         **kwargs) -> float:
    """The smallest sigma Opacus' search finds with epsilon(sigma) <= target_epsilon.

    Opacus' algorithm (double sigma from 20 until under budget, then bisect until epsilon is
    within ``epsilon_tolerance`` below the target), so results agree with Opacus' to its tolerance.
    Steps are ``steps`` or ``int(epochs / sample_rate)``. ``dpfused.get_noise_multiplier`` is
    dpfused's own calibration (PLD by default, 0.1% in sigma).

    Raises:
        ValueError: neither or both of epochs/steps, or a budget no sigma <= 1e6 reaches.
    """
    if (steps is None) == (epochs is None):
        raise ValueError("get_noise_multiplier takes as input EITHER a number of steps or a "
                         "number of epochs")
    if steps is None:
        steps = int(epochs / sample_rate)
    acc = create_accountant(accountant)

    def epsilon(sigma):
        acc.history = [(sigma, sample_rate, steps)]
        return acc.get_epsilon(delta=target_delta, **kwargs)

    eps_high, sigma_low, sigma_high = float("inf"), 0.0, 10.0
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        eps_high = epsilon(sigma_high)
        if sigma_high > MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
    while target_epsilon - eps_high > epsilon_tolerance:
        sigma = (sigma_low + sigma_high) / 2
        eps = epsilon(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high
