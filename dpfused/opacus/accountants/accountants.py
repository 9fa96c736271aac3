"""Opacus' standalone accountants over dp_accounting (see the package docstring)."""

from __future__ import annotations

import abc
import copy
import math
from collections import OrderedDict

import dp_accounting
from dp_accounting import rdp as dp_rdp

from dpfused.accounting.composition import _pld_epsilon

__all__ = ["IAccountant", "PRVAccountant", "RDPAccountant", "GaussianAccountant"]

# The one refusal of "gdp", wherever Opacus code names it (an accountant here, or the engine's).
GDP_REFUSAL = (
    "the Gaussian-DP accountant (accountant='gdp', Opacus' GaussianAccountant) is refused: its "
    "central-limit approximation is not an upper bound and can understate epsilon for few steps "
    "or large sampling rates; use 'prv' / 'pld' (dp_accounting's privacy-loss distributions, "
    "tight) or 'rdp'")


class IAccountant(abc.ABC):
    """Opacus' accountant interface: ``history`` is a list of (sigma, q, steps) runs."""

    def __init__(self):
        self.history: list[tuple[float, float, int]] = []

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """Record one Poisson-sampled Gaussian step (consecutive equal steps share a run)."""
        _check_step(noise_multiplier, sample_rate)
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, count = self.history[-1]
            self.history[-1] = (sigma, q, count + 1)
        else:
            self.history.append((noise_multiplier, sample_rate, 1))

    @abc.abstractmethod
    def get_epsilon(self, delta: float, *args, **kwargs) -> float:
        """epsilon spent so far at ``delta``."""

    def __len__(self) -> int:
        return len(self.history)

    @classmethod
    @abc.abstractmethod
    def mechanism(cls) -> str:
        """The accounting mechanism's name."""

    def get_optimizer_hook_fn(self, sample_rate: float):
        """A callback ``hook(optimizer)`` recording a step at the optimizer's current sigma."""
        def hook_fn(optim):
            self.step(noise_multiplier=optim.noise_multiplier, sample_rate=sample_rate)
        return hook_fn

    def state_dict(self, destination=None):
        destination = OrderedDict() if destination is None else destination
        destination["history"] = copy.deepcopy(self.history)
        destination["mechanism"] = self.mechanism()
        return destination

    def load_state_dict(self, state_dict) -> None:
        """Raises ValueError for an empty state, a missing key or another mechanism's state."""
        if not state_dict:
            raise ValueError("state dict is either None or empty and hence cannot be loaded into "
                             "Privacy Accountant.")
        for key in ("history", "mechanism"):
            if key not in state_dict:
                raise ValueError(f"state_dict does not have the key `{key}`. Cannot be loaded "
                                 "into Privacy Accountant.")
        if state_dict["mechanism"] != self.mechanism():
            raise ValueError(f"state_dict of {state_dict['mechanism']} cannot be loaded into "
                             f"Privacy Accountant with mechanism {self.mechanism()}")
        self.history = list(state_dict["history"])

    def _events(self):
        return [dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), count)
            for sigma, q, count in self.history]


def _check_step(noise_multiplier, sample_rate):
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a number >= 0, got {noise_multiplier!r}")
    if not (isinstance(sample_rate, (int, float)) and 0 <= sample_rate <= 1):
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate!r}")


class RDPAccountant(IAccountant):
    """Rényi-DP accounting (dp_accounting's ``RdpAccountant``) at Opacus' orders by default."""

    DEFAULT_ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))

    def get_privacy_spent(self, *, delta: float, alphas=None) -> tuple[float, float]:
        """(epsilon, the order that gave it)."""
        if not self.history:
            return 0.0, 0.0
        if any(sigma == 0 and q > 0 for sigma, q, _ in self.history):
            return math.inf, math.nan
        accountant = dp_rdp.RdpAccountant(orders=list(alphas or self.DEFAULT_ALPHAS))
        for event in self._events():
            accountant.compose(event)
        epsilon, order = accountant.get_epsilon_and_optimal_order(delta)
        return float(epsilon), float(order)

    def get_epsilon(self, delta: float, alphas=None, **kwargs) -> float:
        return self.get_privacy_spent(delta=delta, alphas=alphas)[0]

    @classmethod
    def mechanism(cls) -> str:
        return "rdp"


class PRVAccountant(IAccountant):
    """Opacus' PRV accountant, computed with dp_accounting's privacy-loss distributions (PLD).

    Both discretize the privacy-loss distribution and compose it numerically; the PLD here is
    pessimistic (an upper bound on epsilon) at a grid of 1e-4 in the privacy loss, finer than
    Opacus' default ``eps_error=0.01``. Opacus returns the upper end of an interval of width up to
    2 ``eps_error`` around the true epsilon, so the two agree to within that tolerance (this one is
    the same or a little smaller).
    ``eps_error`` and ``delta_error`` are accepted for Opacus code and not needed.
    """

    def get_epsilon(self, delta: float, *, eps_error: float = 0.01, delta_error=None,
                    **kwargs) -> float:
        if not self.history:
            return 0.0
        if any(sigma == 0 and q > 0 for sigma, q, _ in self.history):
            return math.inf
        runs: dict[tuple[float, float], int] = {}
        for sigma, q, count in self.history:
            if q > 0:
                runs[(float(q), float(sigma))] = runs.get((float(q), float(sigma)), 0) + count
        if not runs:
            return 0.0
        return _pld_epsilon(runs, None, delta, "add_remove")

    @classmethod
    def mechanism(cls) -> str:
        return "prv"


class GaussianAccountant:
    """Refused: Opacus' GDP accountant rests on a central-limit approximation that can
    understate epsilon. Use ``PRVAccountant`` or ``RDPAccountant``."""

    def __init__(self, *args, **kwargs):
        raise ValueError(GDP_REFUSAL)
