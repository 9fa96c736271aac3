"""Privacy accounting for dpfused, backed by ``dp_accounting`` (DESIGN §7).

Two guarantees are reported:

* **Composed epsilon** (every iterate released). Poisson steps are
  ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` composed over the ledger; cyclic and shuffled
  steps claim no amplification by sampling: each example is used once per epoch, so every epoch
  started composes one ``GaussianDpEvent`` with the smallest sigma seen in that epoch. All DP math is
  dp_accounting's (PLD accountant by default, RDP accountant on request).
* **Last-iterate epsilon** (only the final model released), cyclic sampling and plain SGD only: the
  shifted Rényi divergence bound of Feldman, Mironov, Talwar & Thakurta (2018, Thm 22 and 34), in the
  form DESIGN §7 states it, converted to (epsilon, delta) with dp_accounting's RDP conversion.

Replace-one adjacency (``neighboring="replace_one"``, sensitivity 2C). What dp_accounting 0.6.0 does:

* ``PLDAccountant(NeighborRel.REPLACE_ONE)`` handles both events correctly: a ``GaussianDpEvent``
  becomes the pair N(-1, s^2) vs N(1, s^2) (sensitivity 2) and a Poisson-sampled Gaussian the pair
  (1-q)N(0) + qN(-1) vs (1-q)N(0) + qN(1). We pass the relation through.
* ``RdpAccountant(neighboring_relation=REPLACE_ONE)`` **silently ignores** the relation for a plain
  ``GaussianDpEvent`` (it returns the add/remove curve, sensitivity 1: epsilon too small), and
  **refuses** ``PoissonSampledDpEvent`` (``UnsupportedEventError``: "neighboring_relation must be
  ADD_OR_REMOVE_ONE or REPLACE_SPECIAL").
  We therefore never hand REPLACE_ONE to the RDP accountant. Gaussian steps are composed with sigma/2
  (the exact replace-one curve, alpha * 2 / sigma^2). Poisson steps use Mironov's weak triangle
  inequality (Rényi DP, 2017, Prop. 11 with p = q = 2) through the dataset without the example:
  D_a(P || R) <= (a - 1/2)/(a - 1) * D_2a(P || Q) + D_(2a-1)(Q || R), where P, R are the outputs on the
  two replace-one neighbours and Q on their common add/remove neighbour. dp_accounting's add/remove
  curve of the sampled Gaussian bounds both directions (Mironov, Talwar & Zhang 2019), the inequality
  holds for each step's conditional output, and composition sums the per-step bounds. It is sound and
  uses only dp_accounting's RDP values, but it is loose: prefer ``mechanism="pld"`` for replace-one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import dp_accounting
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp
from dp_accounting.rdp import rdp_privacy_accountant as _rdp_module

__all__ = [
    "MECHANISMS",
    "NEIGHBORINGS",
    "SAMPLINGS",
    "LastIterateBound",
    "LastIterateUnavailable",
    "PrivacyAccountant",
    "PrivacyBudgetExhausted",
    "PrivacyReport",
    "StepRecord",
    "calibrate_noise_multiplier",
    "composed_epsilon",
    "contraction_factors",
    "gaussian_rdp_epsilon",
    "last_iterate_bound",
    "privacy_report",
    "window_rho",
]

MECHANISMS = ("pld", "rdp")
NEIGHBORINGS = ("add_remove", "replace_one")
SAMPLINGS = ("poisson", "cyclic", "shuffle")

_NEIGHBOR_REL = {
    "add_remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
}
_RDP_ORDERS = np.asarray(_rdp_module.DEFAULT_RDP_ORDERS, dtype=np.float64)


class PrivacyBudgetExhausted(RuntimeError):
    """Raised (by the engine) when one more step would exceed the target epsilon."""


class LastIterateUnavailable(ValueError):
    """The last-iterate bound does not apply to this run; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class StepRecord:
    """One logical DP-SGD step as the accountant sees it.

    Attributes:
        noise_multiplier: sigma; the noise std is sigma * C (C = total clipping norm).
        sampling: "poisson", "cyclic" or "shuffle".
        sample_rate: q, for Poisson sampling (None otherwise).
        batch_size: the fixed logical batch size b, for cyclic/shuffle (None for Poisson).
        epoch: epoch index of the step (0-based).
        position_in_epoch: logical batch index within the epoch (0-based).
        batches_per_epoch: logical batches per epoch.
        learning_rate: the step's learning rate, when known (needed for last-iterate).
        weight_decay: SGD ``weight_decay`` (lambda) of the step.
        plain_sgd: True iff the optimizer is ``torch.optim.SGD`` with momentum 0 and no Nesterov.
        batch_size_actual: examples in this logical batch.
        adaptive_clipping: the step also released noisy unclipped counts (already folded into
            ``noise_multiplier`` as sigma_eff); the thresholds then depend on the data.
    """

    noise_multiplier: float
    sampling: str
    sample_rate: float | None = None
    batch_size: int | None = None
    epoch: int = 0
    position_in_epoch: int = 0
    batches_per_epoch: int = 1
    learning_rate: float | None = None
    weight_decay: float = 0.0
    plain_sgd: bool = False
    batch_size_actual: int = 0
    adaptive_clipping: bool = False

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise ValueError(
                f"StepRecord: sampling must be one of {SAMPLINGS}; got {self.sampling!r}."
            )
        if not (self.noise_multiplier >= 0):
            raise ValueError(
                f"StepRecord: noise_multiplier must be >= 0; got {self.noise_multiplier!r}."
            )
        if self.sampling == "poisson":
            if self.sample_rate is None or not (0.0 <= self.sample_rate <= 1.0):
                raise ValueError(
                    "StepRecord: sampling='poisson' needs sample_rate in [0, 1]; "
                    f"got {self.sample_rate!r}."
                )
        elif self.batch_size is None or int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ValueError(
                f"StepRecord: sampling={self.sampling!r} needs an integer batch_size >= 1; "
                f"got {self.batch_size!r}."
            )
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"StepRecord: batches_per_epoch must be >= 1; got {self.batches_per_epoch!r}."
            )
        if self.epoch < 0 or not (0 <= self.position_in_epoch < self.batches_per_epoch):
            raise ValueError(
                "StepRecord: need epoch >= 0 and 0 <= position_in_epoch < batches_per_epoch; got "
                f"epoch={self.epoch}, position_in_epoch={self.position_in_epoch}, "
                f"batches_per_epoch={self.batches_per_epoch}."
            )
        if self.learning_rate is not None and not (self.learning_rate >= 0):
            raise ValueError(
                f"StepRecord: learning_rate must be >= 0 or None; got {self.learning_rate!r}."
            )
        if not (self.weight_decay >= 0):
            raise ValueError(f"StepRecord: weight_decay must be >= 0; got {self.weight_decay!r}.")
        if self.batch_size_actual < 0:
            raise ValueError(
                f"StepRecord: batch_size_actual must be >= 0; got {self.batch_size_actual!r}."
            )


@dataclass(frozen=True)
class LastIterateBound:
    """Shifted-Rényi bound on the last iterate: RDP_last(alpha) = alpha * rho.

    Attributes:
        rho: the worst position's Rényi coefficient (inf if some step had no noise).
        worst_position: the batch position (0-based) of the worst example; None without steps.
        rho_per_position: rho of every batch position 0..m-1 (0 for positions never used).
    """

    rho: float
    worst_position: int | None
    rho_per_position: tuple[float, ...]

    @property
    def sigma_effective(self) -> float:
        """Noise multiplier of the Gaussian mechanism with the same Rényi curve, 1/sqrt(2 rho)."""
        if self.rho == 0:
            return math.inf
        return 1.0 / math.sqrt(2.0 * self.rho)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _check_delta(delta: float) -> float:
    if not (isinstance(delta, (int, float)) and 0.0 < float(delta) < 1.0):
        raise ValueError(f"delta must satisfy 0 < delta < 1; got {delta!r}.")
    return float(delta)


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}; got {value!r}.")
    return value


# ---------------------------------------------------------------------------------------------
# Composed epsilon: pure functions over a ledger summary
# ---------------------------------------------------------------------------------------------


def poisson_runs(records: Iterable[StepRecord]) -> dict[tuple[float, float], int]:
    """Counts of Poisson steps by (sample_rate, noise_multiplier).

    Composition of fixed mechanisms commutes, so identical steps are self-composed in one event.
    """
    runs: Counter[tuple[float, float]] = Counter()
    for rec in records:
        if rec.sampling == "poisson":
            runs[(float(rec.sample_rate), float(rec.noise_multiplier))] += 1
    return dict(runs)


def epoch_sigmas(records: Iterable[StepRecord]) -> list[float]:
    """Smallest sigma of every epoch started by a cyclic/shuffled step (one Gaussian per epoch).

    Each example is used at most once per epoch, so an epoch is one Gaussian mechanism on it; when
    sigma changes mid-epoch the smallest one is the conservative choice.
    """
    smallest: dict[int, float] = {}
    for rec in records:
        if rec.sampling in ("cyclic", "shuffle"):
            sigma = float(rec.noise_multiplier)
            smallest[rec.epoch] = min(sigma, smallest.get(rec.epoch, math.inf))
    return [smallest[e] for e in sorted(smallest)]


def _merged_gaussian_sigma(sigmas: Sequence[float]) -> float:
    """sigma of the one Gaussian equal to composing Gaussians with ``sigmas`` (sensitivity 1).

    Gaussian mechanisms compose exactly: 1/sigma^2 adds up (Dong, Roth & Su 2019, Cor. 3.3), for
    both the Rényi curve and the privacy loss distribution. One event is faster for the PLD
    accountant than E self-composed ones and carries no extra discretisation error.
    """
    if any(s == 0 for s in sigmas):
        return 0.0
    return 1.0 / math.sqrt(sum(1.0 / (s * s) for s in sigmas))


def _rdp_curve(event: dp_accounting.DpEvent, orders: np.ndarray) -> np.ndarray:
    """dp_accounting's add/remove RDP curve of ``event`` at ``orders``."""
    accountant = dp_rdp.RdpAccountant(orders=list(orders))
    accountant.compose(event)
    # dp_accounting has no public getter for the curve; `_rdp` is the composed vector (0.6.0).
    curve = getattr(accountant, "_rdp", None)
    if curve is None or len(curve) != len(orders):
        raise RuntimeError(
            "dp_accounting.rdp.RdpAccountant no longer exposes its RDP curve as `_rdp`; "
            "the replace-one RDP path needs updating for this dp_accounting version."
        )
    return np.asarray(curve, dtype=np.float64)


def _poisson_event(runs: Mapping[tuple[float, float], int]) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), count
            )
            for (q, sigma), count in sorted(runs.items())
            if q > 0
        ]
    )


def _rdp_replace_one_epsilon(
    runs: Mapping[tuple[float, float], int], gaussian_sigma: float | None, delta: float
) -> float:
    """RDP epsilon under replace-one (see the module docstring for what and why)."""
    orders = _RDP_ORDERS
    curve = np.zeros_like(orders)
    if gaussian_sigma is not None:
        # Sensitivity 2C: the exact replace-one curve is the add/remove curve at sigma / 2.
        curve += _rdp_curve(dp_accounting.GaussianDpEvent(gaussian_sigma / 2.0), orders)
    if any(q > 0 for q, _ in runs):
        # Weak triangle inequality through the dataset without the example (Mironov 2017, Prop 11).
        event = _poisson_event(runs)
        at_2a = _rdp_curve(event, 2.0 * orders)
        at_2a_minus_1 = _rdp_curve(event, 2.0 * orders - 1.0)
        curve += (orders - 0.5) / (orders - 1.0) * at_2a + at_2a_minus_1
    eps, _ = _rdp_module.compute_epsilon(orders, curve, delta)
    return float(eps)


def composed_epsilon(
    *,
    poisson: Mapping[tuple[float, float], int],
    epoch_noise: Sequence[float],
    delta: float,
    mechanism: str = "pld",
    neighboring: str = "add_remove",
) -> float:
    """Epsilon of Poisson runs plus one Gaussian per cyclic/shuffled epoch, every iterate released.

    Args:
        poisson: ``{(sample_rate, noise_multiplier): steps}``.
        epoch_noise: the noise multiplier of each cyclic/shuffled epoch started.
        delta: target delta, 0 < delta < 1.
        mechanism: "pld" (dp_accounting PLDAccountant) or "rdp" (RdpAccountant).
        neighboring: "add_remove" or "replace_one".

    Returns:
        epsilon (``math.inf`` if some step had no noise).
    """
    delta = _check_delta(delta)
    _check_choice("mechanism", mechanism, MECHANISMS)
    _check_choice("neighboring", neighboring, NEIGHBORINGS)
    runs = {key: n for key, n in poisson.items() if n > 0 and key[0] > 0}
    if any(sigma == 0 for _, sigma in runs) or any(s == 0 for s in epoch_noise):
        return math.inf
    gaussian_sigma = _merged_gaussian_sigma(epoch_noise) if epoch_noise else None
    if not runs and gaussian_sigma is None:
        return 0.0

    if mechanism == "rdp" and neighboring == "replace_one":
        return _rdp_replace_one_epsilon(runs, gaussian_sigma, delta)

    if mechanism == "pld":
        return _pld_epsilon(runs, gaussian_sigma, delta, neighboring)
    events: list[dp_accounting.DpEvent] = []
    if runs:
        events.append(_poisson_event(runs))
    if gaussian_sigma is not None:
        events.append(dp_accounting.GaussianDpEvent(gaussian_sigma))
    accountant = dp_rdp.RdpAccountant()  # add/remove
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


def _pld_epsilon(runs: Mapping[tuple[float, float], int], gaussian_sigma: float | None,
                 delta: float, neighboring: str) -> float:
    """What ``dp_pld.PLDAccountant`` computes for the same events, with the one-step PLDs cached.

    Building a sampled Gaussian's PLD is ~1 s and does not depend on the step count, so a ledger
    that grows one step at a time (progress bars, budget checks) rebuilds none of it. The
    operations and their order are PLDAccountant's (dp_accounting 0.6.0 ``_maybe_compose``):
    identity, then each (q, sigma) run self-composed in sorted order, then the merged Gaussian;
    tests/test_accounting.py checks that both give the same epsilon.
    """
    pld = dp_pld.privacy_loss_distribution.identity(
        value_discretization_interval=_PLD_DISCRETIZATION)
    for (q, sigma), count in sorted(runs.items()):
        pld = pld.compose(_sampled_gaussian_pld(q, sigma, neighboring).self_compose(count))
    if gaussian_sigma is not None:
        pld = pld.compose(_sampled_gaussian_pld(1.0, gaussian_sigma, neighboring))
    return float(pld.get_epsilon_for_delta(delta))


_PLD_DISCRETIZATION = 1e-4  # PLDAccountant's default value_discretization_interval


@functools.lru_cache(maxsize=32)
def _sampled_gaussian_pld(q: float, sigma: float, neighboring: str):
    """One step's PLD (PLD objects are immutable: compose and self_compose return new ones).

    q = 1 is the plain Gaussian, as PLDAccountant builds it for a ``GaussianDpEvent``.
    """
    return dp_pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma, value_discretization_interval=_PLD_DISCRETIZATION,
        sampling_prob=q, neighboring_relation=_NEIGHBOR_REL[neighboring])


# ---------------------------------------------------------------------------------------------
# Last-iterate epsilon: pure functions (DESIGN §7)
# ---------------------------------------------------------------------------------------------


def contraction_factors(
    learning_rates: np.ndarray,
    weight_decays: np.ndarray,
    *,
    smoothness: float | None,
    convex: bool,
) -> np.ndarray:
    """Lipschitz constant c_k of every step's update map phi_k.

    Smooth (nonconvex) losses: c_k = |1 - eta_k lambda_k| + eta_k L, since clip is 1-Lipschitz.

    Convex losses, clipping never active: phi_k is a gradient step on the lambda-strongly convex,
    (L + lambda)-smooth batch objective, so c_k = max(|1 - eta_k lambda|, |1 - eta_k (L + lambda)|).
    That is |1 - eta_k lambda| whenever eta_k <= 2/(L + 2 lambda), and 1 (DESIGN §7) when lambda = 0
    and eta_k <= 2/L. Without a known L the user's assertion eta_k <= 2/L allows any L <= 2/eta_k;
    the worst, L = 2/eta_k, gives c_k = 1 + eta_k lambda.
    """
    eta = np.asarray(learning_rates, dtype=np.float64)
    lam = np.asarray(weight_decays, dtype=np.float64)
    decay = np.abs(1.0 - eta * lam)
    if not convex:
        return decay + eta * float(smoothness)
    if smoothness is None:
        return np.maximum(decay, 1.0 + eta * lam)
    return np.maximum(decay, np.abs(1.0 - eta * (float(smoothness) + lam)))


def window_rho(
    contractions: np.ndarray, noise_stds: np.ndarray, shift: float
) -> float:
    """Rényi coefficient of one window: RDP_window(alpha) = alpha * rho.

    The window runs over steps t0..t1 (the arrays' entries, in order). With
    w_k = prod_{j=k+1..t1} c_j, the cheapest shifts give
    rho = (1/2) (w_t0 * shift)^2 / sum_k w_k^2 s_k^2. Computed in log space: w_k can overflow
    (c > 1 over long windows) or vanish (c = 0).
    """
    c = np.asarray(contractions, dtype=np.float64)
    s = np.asarray(noise_stds, dtype=np.float64)
    if shift == 0:
        return 0.0
    with np.errstate(divide="ignore"):
        log_c = np.log(c)
        log_s = np.log(s)
    # log w_k = sum_{j>k} log c_j (suffix sums, excluding c_k itself); w_t1 = 1.
    suffix = np.concatenate([np.cumsum(log_c[::-1])[::-1][1:], [0.0]])
    log_num = 2.0 * (suffix[0] + math.log(shift))
    if log_num == -math.inf:
        return 0.0
    log_den = float(np.logaddexp.reduce(2.0 * (suffix + log_s)))
    if log_den == -math.inf:
        return math.inf
    return 0.5 * math.exp(log_num - log_den)


def last_iterate_bound(
    *,
    positions: Sequence[int],
    batches_per_epoch: int,
    learning_rates: Sequence[float],
    noise_multipliers: Sequence[float],
    weight_decays: Sequence[float],
    batch_size: int,
    smoothness: float | None,
    convex: bool = False,
    neighboring: str = "add_remove",
) -> LastIterateBound:
    """Shifted-Rényi bound on the final iterate of cyclic DP-SGD (DESIGN §7).

    Step k: c_k from :func:`contraction_factors`, s_k = eta_k sigma_k C / b and
    Delta_k = eta_k C / b (2 eta_k C / b for replace-one); C = 1 here since it cancels. The example at
    batch position p is used at the steps with that position; each use opens a window ending at the
    step before the next use or at the last step, and the position's rho sums its windows. The
    worst position is reported.

    Args:
        positions: batch position (0..m-1) of every step, in training order.
        batches_per_epoch: m.
        learning_rates, noise_multipliers, weight_decays: per step.
        batch_size: the fixed logical batch size b.
        smoothness: L (None only with ``convex=True``).
        convex: the user asserts convex losses, clipping never active and eta_k <= 2/L.
        neighboring: "add_remove" or "replace_one".

    Returns:
        The bound, with the worst position.
    """
    _check_choice("neighboring", neighboring, NEIGHBORINGS)
    pos = np.asarray(positions, dtype=np.int64)
    eta = np.asarray(learning_rates, dtype=np.float64)
    sigma = np.asarray(noise_multipliers, dtype=np.float64)
    steps = len(pos)
    if steps == 0:
        return LastIterateBound(0.0, None, (0.0,) * batches_per_epoch)
    c = contraction_factors(eta, np.asarray(weight_decays), smoothness=smoothness, convex=convex)
    s = eta * sigma / batch_size
    shift = (2.0 if neighboring == "replace_one" else 1.0) * eta / batch_size

    rho = np.zeros(batches_per_epoch)
    for p in range(batches_per_epoch):
        uses = np.flatnonzero(pos == p)
        ends = np.append(uses[1:] - 1, steps - 1)
        rho[p] = sum(
            window_rho(c[t0 : t1 + 1], s[t0 : t1 + 1], float(shift[t0]))
            for t0, t1 in zip(uses, ends)
        )
    # Ties go to the latest position: its last window is the shortest.
    worst = int(batches_per_epoch - 1 - np.argmax(rho[::-1]))
    return LastIterateBound(float(rho[worst]), worst, tuple(float(r) for r in rho))


def gaussian_rdp_epsilon(rho: float, delta: float) -> float:
    """(epsilon, delta) of the Rényi curve alpha * rho, via dp_accounting's RDP conversion.

    alpha * rho is the curve of a Gaussian mechanism with sigma = 1/sqrt(2 rho), so we compose
    ``GaussianDpEvent(sigma)`` into an ``RdpAccountant``. The PLD of that Gaussian would give a smaller
    epsilon, but it is not justified here: the shifted-Rényi argument bounds only the Rényi
    divergences of the two last iterates, not their privacy loss distribution, and a Rényi curve
    does not determine the (epsilon, delta) profile. The RDP -> DP conversion uses the curve alone.
    """
    delta = _check_delta(delta)
    if rho == 0:
        return 0.0
    if not math.isfinite(rho):
        return math.inf
    accountant = dp_rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.0 / math.sqrt(2.0 * rho)))
    return float(accountant.get_epsilon(delta))


def _check_last_iterate(
    records: Sequence[StepRecord], *, smoothness: float | None, convex: bool
) -> None:
    """Raise LastIterateUnavailable with the first reason the bound does not apply."""
    for k, rec in enumerate(records):
        if rec.sampling != "cyclic":
            why = (
                "a fresh permutation every epoch is not a fixed order"
                if rec.sampling == "shuffle"
                else "the bound has no amplification by Poisson sampling"
            )
            raise LastIterateUnavailable(
                f"last-iterate accounting needs cyclic sampling (one fixed order); step {k} used "
                f"sampling={rec.sampling!r} ({why}). Use sampling='cyclic' or report the composed "
                "epsilon."
            )
        if not rec.plain_sgd:
            raise LastIterateUnavailable(
                f"last-iterate accounting needs plain SGD (torch.optim.SGD with momentum=0, "
                f"nesterov=False); step {k} used another optimizer (momentum, Nesterov or an "
                "adaptive method such as Adam are not covered)."
            )
        if rec.adaptive_clipping:
            raise LastIterateUnavailable(
                f"last-iterate accounting needs fixed clipping thresholds; step {k} adapted them "
                "from noisy counts (adaptive_clipping), so the update maps depend on released "
                "data. Report the composed epsilon, or train without adaptive_clipping."
            )
        if rec.learning_rate is None:
            raise LastIterateUnavailable(
                f"last-iterate accounting needs every learning rate; step {k} has none recorded."
            )
    if not convex and (smoothness is None or not smoothness > 0):
        raise LastIterateUnavailable(
            "last-iterate accounting needs the smoothness constant L > 0 of the per-example losses "
            f"(got smoothness={smoothness!r}); pass smoothness=L, or convex=True if the losses are "
            "convex, clipping is never active and every learning rate is <= 2/L."
        )
    if convex and smoothness is not None and not smoothness > 0:
        raise LastIterateUnavailable(f"smoothness must be > 0 when given; got {smoothness!r}.")
    for k, rec in enumerate(records):
        first = records[0]
        if convex and smoothness is not None and rec.learning_rate > 2.0 / smoothness:
            raise LastIterateUnavailable(
                f"convex=True needs learning rates <= 2/L = {2.0 / smoothness:.6g}; step {k} used "
                f"{rec.learning_rate:.6g}."
            )
        if rec.batch_size != first.batch_size or rec.batches_per_epoch != first.batches_per_epoch:
            raise LastIterateUnavailable(
                "last-iterate accounting needs one fixed batch size and batches per epoch; step "
                f"{k} has batch_size={rec.batch_size}, batches_per_epoch={rec.batches_per_epoch} "
                f"but step 0 has {first.batch_size}, {first.batches_per_epoch}."
            )


def _last_iterate_from_records(
    records: Sequence[StepRecord], *, smoothness: float | None, convex: bool, neighboring: str
) -> LastIterateBound:
    _check_last_iterate(records, smoothness=smoothness, convex=convex)
    if not records:
        return LastIterateBound(0.0, None, ())
    return last_iterate_bound(
        positions=[r.position_in_epoch for r in records],
        batches_per_epoch=records[0].batches_per_epoch,
        learning_rates=[r.learning_rate for r in records],
        noise_multipliers=[r.noise_multiplier for r in records],
        weight_decays=[r.weight_decay for r in records],
        batch_size=int(records[0].batch_size),
        smoothness=smoothness,
        convex=convex,
        neighboring=neighboring,
    )


def _last_iterate_assumptions(
    records: Sequence[StepRecord], *, smoothness: float | None, convex: bool, worst: int | None
) -> list[str]:
    out = ["only the final model is released (intermediate iterates stay secret)"]
    if convex:
        bound = f"L={smoothness:g}" if smoothness is not None else "some L"
        out.append(
            f"every per-example loss is convex and {bound}-smooth, clipping is never active, and "
            "every learning rate is <= 2/L"
        )
    else:
        out.append(f"every per-example loss is L-smooth with L={smoothness:g}")
    out.append("plain SGD (torch.optim.SGD, momentum=0, nesterov=False), learning rates as recorded")
    if records:
        out.append(
            f"fixed cyclic order: batch size {records[0].batch_size}, "
            f"{records[0].batches_per_epoch} batches per epoch, the same order every epoch"
        )
    if worst is not None:
        out.append(f"worst example: batch position {worst} (0-based)")
    return out


# ---------------------------------------------------------------------------------------------
# Accountant
# ---------------------------------------------------------------------------------------------


class PrivacyAccountant:
    """A ledger of :class:`StepRecord` and the epsilons it implies.

    Args:
        mechanism: "pld" (dp_accounting's PLD accountant, default, tighter) or "rdp".
        neighboring: "add_remove" (default) or "replace_one" (sensitivity 2C).

    Raises:
        ValueError: unknown mechanism or neighboring.
    """

    def __init__(self, *, mechanism: str = "pld", neighboring: str = "add_remove"):
        self._mechanism = _check_choice("mechanism", mechanism, MECHANISMS)
        self._neighboring = _check_choice("neighboring", neighboring, NEIGHBORINGS)
        self._records: list[StepRecord] = []
        self._cache: dict[tuple, float] = {}

    # -- ledger ----------------------------------------------------------------------------------
    @property
    def mechanism(self) -> str:
        return self._mechanism

    @property
    def neighboring(self) -> str:
        return self._neighboring

    @property
    def records(self) -> tuple[StepRecord, ...]:
        return tuple(self._records)

    @property
    def steps(self) -> int:
        """Logical steps recorded."""
        return len(self._records)

    @property
    def epochs_started(self) -> int:
        """Distinct epochs in which at least one step was recorded."""
        return len({r.epoch for r in self._records})

    def record_step(self, rec: StepRecord) -> None:
        """Append one logical step to the ledger."""
        if not isinstance(rec, StepRecord):
            raise TypeError(f"record_step expects a StepRecord; got {type(rec).__name__}.")
        self._records.append(rec)

    # -- composed epsilon ------------------------------------------------------------------------
    def _epsilon_of(self, records: Sequence[StepRecord], delta: float) -> float:
        delta = _check_delta(delta)
        runs = poisson_runs(records)
        sigmas = epoch_sigmas(records)
        # Identical summaries give identical epsilons: a budget check before a step and the
        # report after it usually share one computation.
        key = (tuple(sorted(runs.items())), tuple(sorted(sigmas)), delta)
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = composed_epsilon(
                poisson=runs,
                epoch_noise=sigmas,
                delta=delta,
                mechanism=self._mechanism,
                neighboring=self._neighboring,
            )
        return self._cache[key]

    def get_epsilon(self, delta: float) -> float:
        """Composed epsilon of the ledger (every iterate released).

        Raises:
            ValueError: delta not in (0, 1).
        """
        return self._epsilon_of(self._records, delta)

    def get_epsilon_if(self, rec: StepRecord, delta: float) -> float:
        """Composed epsilon after one more, prospective, step ``rec`` (for budget checks)."""
        if not isinstance(rec, StepRecord):
            raise TypeError(f"get_epsilon_if expects a StepRecord; got {type(rec).__name__}.")
        return self._epsilon_of([*self._records, rec], delta)

    def epsilon_if_over_budget(
        self, rec: StepRecord, delta: float, max_epsilon: float
    ) -> float | None:
        """Epsilon after step ``rec`` if it would exceed ``max_epsilon``, else None.

        The exact (PLD) composition costs a fraction of a second per call on long runs. RDP is
        also a valid upper bound on the true epsilon and costs microseconds: when it is already
        within budget the step is safe whatever PLD says, and PLD runs only near the budget.
        """
        records = [*self._records, rec]
        if self._mechanism == "pld" and self._neighboring == "add_remove":
            screen = composed_epsilon(
                poisson=poisson_runs(records), epoch_noise=epoch_sigmas(records),
                delta=delta, mechanism="rdp", neighboring="add_remove",
            )
            if screen <= max_epsilon:
                return None
        epsilon = self._epsilon_of(records, delta)
        return epsilon if epsilon > max_epsilon else None

    # -- last-iterate epsilon --------------------------------------------------------------------
    def last_iterate_bound(
        self, *, smoothness: float | None = None, convex: bool = False
    ) -> LastIterateBound:
        """The shifted-Rényi bound (rho and worst position) of the ledger.

        Raises:
            LastIterateUnavailable: the run is not cyclic plain SGD with known learning rates, or
                L is missing (see :func:`get_last_iterate_epsilon`).
        """
        return _last_iterate_from_records(
            self._records, smoothness=smoothness, convex=convex, neighboring=self._neighboring
        )

    def get_last_iterate_epsilon(
        self, delta: float, *, smoothness: float | None = None, convex: bool = False
    ) -> float:
        """Epsilon when only the final model is released (DESIGN §7).

        Args:
            delta: target delta, 0 < delta < 1.
            smoothness: L, every per-example loss is L-smooth. Required unless ``convex``.
            convex: the user asserts convex losses, clipping never active, learning rates <= 2/L
                (checked when ``smoothness`` is given).

        Raises:
            LastIterateUnavailable: sampling not cyclic, optimizer not plain SGD, learning rate
                unknown, L missing or <= 0, or a learning rate above 2/L with ``convex``.
            ValueError: delta not in (0, 1).
        """
        delta = _check_delta(delta)
        bound = self.last_iterate_bound(smoothness=smoothness, convex=convex)
        return gaussian_rdp_epsilon(bound.rho, delta)

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The ledger, as plain Python data."""
        return {
            "version": 1,
            "mechanism": self._mechanism,
            "neighboring": self._neighboring,
            "records": [dataclasses.asdict(r) for r in self._records],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the ledger saved by :meth:`state_dict`.

        Raises:
            ValueError: the state was saved with another mechanism or neighboring relation.
        """
        for name in ("mechanism", "neighboring"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"load_state_dict: the saved ledger used {name}={state[name]!r} but this "
                    f"accountant uses {getattr(self, name)!r}; build the accountant with "
                    f"{name}={state[name]!r}."
                )
        self._records = [StepRecord(**r) for r in state["records"]]
        self._cache.clear()


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrivacyReport:
    """What was spent, and under which assumptions.

    ``sample_rate`` is the largest q of the Poisson steps, ``batch_size`` the (largest) fixed batch
    size of the cyclic/shuffled ones, ``noise_multiplier`` the smallest sigma used.
    """

    composed_epsilon: float
    last_iterate_epsilon: float | None
    last_iterate_reason: str | None
    delta: float
    steps: int
    epochs: int
    sampling: str | None
    sample_rate: float | None
    batch_size: int | None
    noise_multiplier: float | None
    neighboring: str
    accountant: str
    assumptions: tuple[str, ...]
    last_iterate_worst_position: int | None = None

    def __str__(self) -> str:
        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.4g}"

        if self.sampling == "poisson":
            sampling = f"poisson, sample rate {fmt(self.sample_rate)}"
        elif self.sampling in ("cyclic", "shuffle"):
            sampling = f"{self.sampling}, batch size {self.batch_size}"
        else:
            sampling = self.sampling or "none (no steps)"
        if self.last_iterate_epsilon is not None:
            last = f"{fmt(self.last_iterate_epsilon)}  (only the final model released)"
        else:
            last = f"n/a  ({self.last_iterate_reason})"
        rows = [
            ("accountant", f"{self.accountant}, {self.neighboring}"),
            ("sampling", sampling),
            ("noise multiplier", fmt(self.noise_multiplier)),
            ("steps / epochs", f"{self.steps} / {self.epochs}"),
            ("delta", f"{self.delta:g}"),
            ("composed epsilon", f"{fmt(self.composed_epsilon)}  (every iterate released)"),
            ("last-iterate epsilon", last),
        ]
        width = max(len(name) for name, _ in rows)
        lines = ["dpfused privacy report"]
        lines += [f"  {name.ljust(width)}  {value}" for name, value in rows]
        lines.append("  assumptions:")
        lines += [f"    - {a}" for a in self.assumptions]
        return "\n".join(lines)


def privacy_report(
    accountant: PrivacyAccountant,
    delta: float,
    *,
    smoothness: float | None = None,
    convex: bool = False,
) -> PrivacyReport:
    """Composed epsilon, and the last-iterate epsilon where its assumptions hold.

    Args:
        accountant: the ledger.
        delta: target delta, 0 < delta < 1.
        smoothness: L for the last-iterate bound (omit to skip it unless ``convex``).
        convex: see :meth:`PrivacyAccountant.get_last_iterate_epsilon`.

    Returns:
        The report; ``last_iterate_reason`` says why the last-iterate epsilon is missing.
    """
    delta = _check_delta(delta)
    records = accountant.records
    samplings = sorted({r.sampling for r in records})
    sampling = samplings[0] if len(samplings) == 1 else ("mixed" if samplings else None)
    rates = [r.sample_rate for r in records if r.sampling == "poisson"]
    sizes = [r.batch_size for r in records if r.sampling != "poisson"]
    sigmas = [r.noise_multiplier for r in records]

    assumptions = [
        "every iterate may be released (composed epsilon)",
        "neighbouring datasets differ by "
        + ("adding or removing one example" if accountant.neighboring == "add_remove"
           else "replacing one example (sensitivity 2C)"),
        "each example's gradient is clipped to the total norm C and the noise std is sigma*C",
    ]
    if any(r.adaptive_clipping for r in records):
        assumptions.append(
            "adaptive clipping: each step also released noisy per-group counts of unclipped "
            "examples; the noise multiplier shown is sigma_eff of gradient and counts together"
        )
    if "poisson" in samplings:
        assumptions.append("Poisson sampling: every example joins each batch independently with rate q")
    if {"cyclic", "shuffle"} & set(samplings):
        assumptions.append(
            "cyclic/shuffled batches: each example is used once per epoch; one Gaussian per epoch, "
            "no amplification by sampling claimed"
        )

    last_eps: float | None = None
    reason: str | None = None
    worst: int | None = None
    try:
        bound = accountant.last_iterate_bound(smoothness=smoothness, convex=convex)
        last_eps = gaussian_rdp_epsilon(bound.rho, delta)
        worst = bound.worst_position
        assumptions += _last_iterate_assumptions(
            records, smoothness=smoothness, convex=convex, worst=worst
        )
    except LastIterateUnavailable as exc:
        reason = exc.reason

    composed = accountant.get_epsilon(delta)
    if last_eps is not None and composed < last_eps:
        # The final model is one of the released iterates, so the composed bound covers it too
        # (post-processing); report the smaller one and say which bound is binding.
        assumptions.append(
            f"the shifted-Renyi bound ({last_eps:.4g}) is above the composed bound here; the "
            "composed bound also covers the final model and is reported"
        )
        last_eps = composed

    return PrivacyReport(
        composed_epsilon=composed,
        last_iterate_epsilon=last_eps,
        last_iterate_reason=reason,
        delta=delta,
        steps=accountant.steps,
        epochs=accountant.epochs_started,
        sampling=sampling,
        sample_rate=max(rates) if rates else None,
        batch_size=max(sizes) if sizes else None,
        noise_multiplier=min(sigmas) if sigmas else None,
        neighboring=accountant.neighboring,
        accountant=accountant.mechanism,
        assumptions=tuple(assumptions),
        last_iterate_worst_position=worst,
    )


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


def _bisect_sigma(
    epsilon_of, target: float, *, start: float = 1.0, factor: float = 2.0, rtol: float = 1e-3
) -> float:
    """Smallest sigma (to relative tolerance rtol) with epsilon_of(sigma) <= target.

    Brackets from ``start`` by steps of ``factor``, then bisects geometrically; returns the
    conservative end of the final bracket. ``epsilon_of`` must decrease in sigma.
    """
    lo, hi = None, start
    while epsilon_of(hi) > target:
        lo, hi = hi, factor * hi
        if hi > 1e6:
            raise ValueError(
                f"target_epsilon={target} is not reachable with noise_multiplier <= 1e6."
            )
    if lo is None:
        lo = hi / factor
        while epsilon_of(lo) <= target:
            hi, lo = lo, lo / factor
            if lo < 1e-6:
                return hi
    while hi - lo > rtol * hi:
        mid = math.sqrt(lo * hi)
        if epsilon_of(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def _calibrate_composed(
    *, target: float, delta: float, runs_of, mechanism: str, neighboring: str
) -> float:
    """Bisection on the composed epsilon; ``runs_of(sigma)`` gives (poisson, epoch_noise).

    The PLD accountant is slow far from the answer (large epsilons), so it starts from the RDP
    answer, which is close (RDP's conversion is looser, so usually a little above).
    """

    def epsilon_with(mech):
        def epsilon_of(sigma):
            poisson, epoch_noise = runs_of(sigma)
            return composed_epsilon(poisson=poisson, epoch_noise=epoch_noise, delta=delta,
                                    mechanism=mech, neighboring=neighboring)
        return epsilon_of

    sigma_rdp = _bisect_sigma(epsilon_with("rdp"), target)
    if mechanism == "rdp":
        return sigma_rdp
    return _bisect_sigma(epsilon_with("pld"), target, start=sigma_rdp, factor=1.05)


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sampling: str,
    sample_rate: float | None = None,
    num_samples: int | None = None,
    batch_size: int | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    mechanism: str = "pld",
    neighboring: str = "add_remove",
    last_iterate: Mapping[str, Any] | None = None,
    drop_last: bool = True,
) -> float:
    """Noise multiplier sigma whose epsilon is at most ``target_epsilon`` (bisection, rtol 1e-3).

    Poisson: q = ``sample_rate`` or ``batch_size / num_samples``; steps = ``steps`` or
    ``epochs * round(1/q)``. Cyclic/shuffle: epochs = ``epochs`` or ceil(steps / batches per epoch),
    each composing one Gaussian. With ``last_iterate`` (cyclic only) the last-iterate bound is
    calibrated instead of the composed one; its keys: ``smoothness`` (L), ``learning_rate``
    (constant eta), ``weight_decay`` (default 0), ``convex`` (default False).

    Returns:
        sigma with epsilon(sigma) <= target_epsilon, within 0.1% of the smallest such sigma.

    Raises:
        ValueError: bad or missing arguments, unknown mechanism/neighboring, target not reachable.
        LastIterateUnavailable: ``last_iterate`` asked for a setting the bound does not cover.
    """
    if not (target_epsilon > 0):
        raise ValueError(f"target_epsilon must be > 0; got {target_epsilon!r}.")
    delta = _check_delta(delta)
    _check_choice("sampling", sampling, SAMPLINGS)
    _check_choice("mechanism", mechanism, MECHANISMS)
    _check_choice("neighboring", neighboring, NEIGHBORINGS)

    if sampling == "poisson":
        if last_iterate is not None:
            raise LastIterateUnavailable(
                "last-iterate accounting needs cyclic sampling (one fixed order); got "
                "sampling='poisson' (the bound has no amplification by Poisson sampling)."
            )
        if sample_rate is None:
            if batch_size is None or num_samples is None:
                raise ValueError(
                    "sampling='poisson' needs sample_rate, or batch_size and num_samples."
                )
            sample_rate = batch_size / num_samples
        if not (0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1]; got {sample_rate!r}.")
        if steps is None:
            if epochs is None:
                raise ValueError("sampling='poisson' needs steps or epochs.")
            steps = int(epochs) * max(1, round(1.0 / sample_rate))
        q, n = float(sample_rate), int(steps)
        return _calibrate_composed(
            target=target_epsilon, delta=delta, runs_of=lambda sigma: ({(q, sigma): n}, []),
            mechanism=mechanism, neighboring=neighboring,
        )

    if sample_rate is not None:
        raise ValueError(f"sample_rate applies to sampling='poisson' only; got sampling={sampling!r}.")
    per_epoch = None
    if num_samples is not None and batch_size is not None:
        if batch_size < 1 or (drop_last and batch_size > num_samples):
            raise ValueError(f"batch_size must be in [1, num_samples]; got {batch_size!r}.")
        per_epoch = num_samples // batch_size if drop_last else -(-num_samples // batch_size)
    if epochs is None:
        if steps is None or per_epoch is None:
            raise ValueError(
                f"sampling={sampling!r} needs epochs, or steps with num_samples and batch_size."
            )
        epochs = -(-int(steps) // per_epoch)

    if last_iterate is None:
        n_epochs = int(epochs)
        return _calibrate_composed(
            target=target_epsilon, delta=delta, runs_of=lambda sigma: ({}, [sigma] * n_epochs),
            mechanism=mechanism, neighboring=neighboring,
        )

    # Last-iterate: with a constant sigma, s_k is proportional to sigma and Delta_k is not, so
    # rho(sigma) = rho(1) / sigma^2.
    if per_epoch is None:
        raise ValueError("last_iterate calibration needs num_samples and batch_size.")
    if "learning_rate" not in last_iterate:
        raise LastIterateUnavailable("last_iterate calibration needs a learning_rate.")
    total = int(steps) if steps is not None else int(epochs) * per_epoch
    template = [
        StepRecord(
            noise_multiplier=1.0,
            sampling=sampling,
            batch_size=batch_size,
            epoch=k // per_epoch,
            position_in_epoch=k % per_epoch,
            batches_per_epoch=per_epoch,
            learning_rate=float(last_iterate["learning_rate"]),
            weight_decay=float(last_iterate.get("weight_decay", 0.0)),
            plain_sgd=True,
            batch_size_actual=batch_size,
        )
        for k in range(total)
    ]
    rho_1 = _last_iterate_from_records(
        template,
        smoothness=last_iterate.get("smoothness"),
        convex=bool(last_iterate.get("convex", False)),
        neighboring=neighboring,
    ).rho
    return _bisect_sigma(
        lambda sigma: gaussian_rdp_epsilon(rho_1 / sigma**2, delta), target_epsilon
    )
