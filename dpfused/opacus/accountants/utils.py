"""Opacus' ``get_noise_multiplier`` (``opacus.accountants.utils``), over this package's accountants."""

from __future__ import annotations

from dpfused.accounting.calibration import smallest_noise_multiplier
from dpfused.opacus.accountants.registry import create_accountant

__all__ = ["get_noise_multiplier"]


def get_noise_multiplier(*, target_epsilon: float, target_delta: float, sample_rate: float,
                         epochs: int | None = None, steps: int | None = None,
                         accountant: str = "rdp", epsilon_tolerance: float = 0.01,
                         **kwargs) -> float:
    """The smallest sigma whose epsilon, as ``accountant`` computes it for Poisson-sampled steps at
    ``sample_rate``, is at most ``target_epsilon``: Opacus' function, on dpfused's one sigma search.

    Steps are ``steps`` or ``int(epochs / sample_rate)``, as Opacus counts them. The search
    (``dpfused.accounting.calibration.smallest_noise_multiplier``) finds sigma to 0.1% on the
    conservative side, so epsilon lands closer below the target than Opacus' ``epsilon_tolerance``
    asks: it is accepted and not needed. For the sampling a ``PrivacyEngine`` performs use
    ``make_private_with_epsilon`` (or ``dpfused.accounting.calibrate_noise_multiplier``).

    Args:
        accountant: "rdp" (default, as Opacus), "prv" (dp_accounting's PLD; "pld" is the same), or
            a name given to ``register_accountant``; "gdp" is refused with the reason.
        **kwargs: passed to the accountant's ``get_epsilon``, as in Opacus.

    Raises:
        ValueError: neither or both of epochs/steps, an unknown accountant, or a budget no
            sigma <= 1e6 reaches.
    """
    if (steps is None) == (epochs is None):
        raise ValueError("get_noise_multiplier takes as input EITHER a number of steps or a "
                         "number of epochs")
    if steps is None:
        steps = int(epochs / sample_rate)
    planned = create_accountant("prv" if accountant == "pld" else accountant)

    def epsilon_of(sigma: float) -> float:
        planned.history = [(sigma, sample_rate, steps)]
        return planned.get_epsilon(delta=target_delta, **kwargs)

    return smallest_noise_multiplier(epsilon_of, target_epsilon)
