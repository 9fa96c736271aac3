"""Opacus' standalone accountants, for code that plans budgets without training:

    from dpfused.opacus.accountants import RDPAccountant      # was: from opacus.accountants import ...
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=1.1, sample_rate=0.01)
    accountant.get_epsilon(delta=1e-5)

Same API as Opacus 1.6 (``step``, ``get_epsilon``, ``history``, ``state_dict``/
``load_state_dict``, ``create_accountant``, ``register_accountant``, ``get_noise_multiplier``),
every number from dp_accounting: ``RDPAccountant`` on its Rényi accountant at Opacus' orders,
``PRVAccountant`` on its privacy-loss distributions (PLD). Opacus' ``GaussianAccountant`` ("gdp") is
refused with the reason: its central-limit approximation is not an upper bound on epsilon.
These accountants assume Poisson sampling, as Opacus'; a ``dpfused.PrivacyEngine`` accounts the
sampling it performs itself (``engine.accountant``).
"""

from dpfused.opacus.accountants import registry
from dpfused.opacus.accountants.accountants import (
    GaussianAccountant,
    IAccountant,
    PRVAccountant,
    RDPAccountant,
)
from dpfused.opacus.accountants.registry import create_accountant, register_accountant
from dpfused.opacus.accountants.utils import get_noise_multiplier

__all__ = ["GaussianAccountant", "IAccountant", "PRVAccountant", "RDPAccountant",
           "create_accountant", "get_noise_multiplier", "register_accountant", "registry"]
