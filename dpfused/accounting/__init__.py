"""Privacy accounting on dp_accounting's events (docs/design.md §7).

- ``records``: the ledger's entries (a ``DpEvent`` per step, last-iterate facts) and adjacency names;
- ``composition``: composed epsilon (every iterate released);
- ``last_iterate``: the shifted-Rényi bound on the final model;
- ``ledger``: ``PrivacyAccountant``;
- ``report``: ``privacy_report``; ``calibration``: ``calibrate_noise_multiplier``.
"""

from dpfused.accounting.calibration import calibrate_noise_multiplier
from dpfused.accounting.composition import composed_dp_event, composed_epsilon
from dpfused.accounting.last_iterate import (
    LastIterateBound,
    contraction_factors,
    gaussian_rdp_epsilon,
    last_iterate_bound,
    window_rho,
)
from dpfused.accounting.ledger import PrivacyAccountant
from dpfused.accounting.records import (
    MECHANISMS,
    NEIGHBORINGS,
    UNSAMPLED,
    IterateFacts,
    LastIterateUnavailable,
    LedgerEntry,
    PrivacyBudgetExhausted,
    SampledStep,
    check_neighboring,
    default_neighboring,
    warn_if_delta_not_small,
)
from dpfused.accounting.report import PrivacyReport, privacy_report

__all__ = [
    "MECHANISMS",
    "NEIGHBORINGS",
    "UNSAMPLED",
    "IterateFacts",
    "LastIterateBound",
    "LastIterateUnavailable",
    "LedgerEntry",
    "PrivacyAccountant",
    "PrivacyBudgetExhausted",
    "PrivacyReport",
    "SampledStep",
    "calibrate_noise_multiplier",
    "check_neighboring",
    "composed_dp_event",
    "composed_epsilon",
    "contraction_factors",
    "default_neighboring",
    "gaussian_rdp_epsilon",
    "last_iterate_bound",
    "privacy_report",
    "warn_if_delta_not_small",
    "window_rho",
]
