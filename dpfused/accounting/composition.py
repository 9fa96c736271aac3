"""Composed epsilon (every iterate released): pure functions over the ledger's events (§7).

Poisson steps are ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` composed over the ledger;
truncated Poisson steps ``TruncatedSubsampledGaussianDpEvent(N, q, K, sigma)`` (PLD only: the RDP
accountant has no analysis of them). Cyclic Poisson steps (b partitions, an example joins at most
one step of each cycle of b) compose one ``PoissonSampledDpEvent(q b, GaussianDpEvent(sigma))`` per
cycle started, with the largest rate and the smallest sigma of the cycle: ceil(T/b) events for T
steps, the amplified BandMF analysis (Choquette-Choo et al. 2023, Thm. 4). Cyclic and shuffled steps
claim no amplification by sampling: each example is used once per epoch, so every epoch started
(of every phase) composes one ``GaussianDpEvent`` with the smallest sigma seen in that epoch.
All DP math is dp_accounting's (PLD accountant by default, RDP accountant on request).

Truncated Poisson and the dataset size. dp_accounting analyses the event for a dataset of
``dataset_size`` examples that holds the differing one. Under add/remove the run's N examples may
be the larger neighbour (an example removed: size N) or the smaller (one added: size N + 1), so
the epsilon is the larger of the two compositions, at N and at N + 1 (the adversary's neighbour is
fixed for the whole run).

Adjacency. Zero-out (one example replaced by a null example with zero gradient) changes the clipped
sum by at most C, exactly as adding or removing the example does, so both map to dp_accounting's
``ADD_OR_REMOVE_ONE``; replace-one moves it by up to 2C. What dp_accounting 0.6.0 does with it:

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

import functools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import dp_accounting
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp
from dp_accounting.rdp import rdp_privacy_accountant as _rdp_module

from dpfused.accounting.records import (
    MECHANISMS,
    NEIGHBORINGS,
    SampledStep,
)
from dpfused.arguments import check_choice, check_delta, refuse_truncation_under_rdp

__all__ = ["composed_dp_event", "composed_epsilon", "epoch_sigmas", "poisson_runs",
           "truncated_runs"]

_NEIGHBOR_REL = {
    "add_remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "zero_out": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
}
_RDP_ORDERS = np.asarray(_rdp_module.DEFAULT_RDP_ORDERS, dtype=np.float64)


def composed_dp_event(steps: Sequence[SampledStep]) -> dp_accounting.DpEvent:
    """The whole run as one dp_accounting event: Poisson steps (one per cycle of cyclic Poisson
    steps), truncated Poisson steps (at the run's N), then one Gaussian per epoch, then a
    ``NonPrivateDpEvent`` per step on batches no private data loader drew."""
    steps = list(steps)
    events: list[dp_accounting.DpEvent] = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), count)
        for (q, sigma), count in sorted(poisson_runs(steps).items())]
    events += [dp_accounting.SelfComposedDpEvent(_truncated_event(key, 0), count)
               for key, count in sorted(truncated_runs(steps).items())]
    events += [dp_accounting.GaussianDpEvent(sigma) for sigma in epoch_sigmas(steps)]
    events += [s.event for s in steps if not s.guaranteed]
    return dp_accounting.ComposedDpEvent(events)


def poisson_runs(steps: Iterable[SampledStep]) -> dict[tuple[float, float], int]:
    """Counts of Poisson-sampled Gaussians by (sample_rate, noise_multiplier): every plain Poisson
    step, and one per cycle of cyclic Poisson steps (``cycle_events``).

    Composition of fixed mechanisms commutes, so identical steps are self-composed in one event.
    """
    steps = list(steps)
    runs: Counter[tuple[float, float]] = Counter()
    for step in steps:
        if step.sampling == "poisson" and not step.truncated:
            runs[(step.sample_rate, step.noise_multiplier)] += 1
    runs.update(cycle_events(steps))
    return dict(runs)


def cycle_events(steps: Iterable[SampledStep]) -> list[tuple[float, float]]:
    """(rate, sigma) of every cycle of cyclic Poisson steps (of every phase) that has a step.

    An example belongs to one partition and can join only that partition's step of a cycle of b
    steps; the BandMF strategy's columns of steps b apart have disjoint supports, so each cycle is
    one Poisson-sampled Gaussian for it (Choquette-Choo et al. 2023, Thm. 4). Where the rate or
    sigma changes within a cycle, the largest rate and the smallest sigma cover every partition.
    A partial cycle counts whole: ceil(T/b) events for T steps.
    """
    rate: dict[tuple[int, int], float] = {}
    sigma: dict[tuple[int, int], float] = {}
    for step in steps:
        if step.sampling == "cyclic_poisson":
            key = (step.phase, step.cycle)
            rate[key] = max(step.sample_rate, rate.get(key, 0.0))
            sigma[key] = min(step.noise_multiplier, sigma.get(key, math.inf))
    return [(rate[key], sigma[key]) for key in sorted(rate)]


def truncated_runs(steps: Iterable[SampledStep]) -> dict[tuple[int, float, int, float], int]:
    """Counts of truncated Poisson steps by (N, q, K, sigma)."""
    runs: Counter[tuple[int, float, int, float]] = Counter()
    for step in steps:
        if step.truncated:
            runs[(step.dataset_size, step.sample_rate, step.max_batch_size,
                  step.noise_multiplier)] += 1
    return dict(runs)


def _truncated_event(key, extra_examples: int) -> dp_accounting.TruncatedSubsampledGaussianDpEvent:
    """The truncated event of run ``key`` = (N, q, K, sigma) for a dataset of N + extra examples."""
    n, q, k, sigma = key
    return dp_accounting.TruncatedSubsampledGaussianDpEvent(
        dataset_size=n + extra_examples, sampling_probability=q, truncated_batch_size=k,
        noise_multiplier=sigma)


def epoch_sigmas(steps: Iterable[SampledStep]) -> list[float]:
    """Smallest sigma of every epoch started by a cyclic/shuffled step (one Gaussian per epoch).

    Each example is used at most once per epoch, so an epoch is one Gaussian mechanism on it; when
    sigma changes mid-epoch the smallest one is the conservative choice. An epoch is a (phase,
    epoch) pair: a second data loader (a new phase) counts its epochs from 0 again, and its epoch 0
    uses every example once more.
    """
    smallest: dict[tuple[int, int], float] = {}
    for step in steps:
        if step.sampling in ("cyclic", "shuffle"):
            key = (step.phase, step.epoch)
            smallest[key] = min(step.noise_multiplier, smallest.get(key, math.inf))
    return [smallest[key] for key in sorted(smallest)]


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
    truncated: Mapping[tuple[int, float, int, float], int] | None = None,
) -> float:
    """Epsilon of Poisson runs plus one Gaussian per cyclic/shuffled epoch, every iterate released.

    Args:
        poisson: ``{(sample_rate, noise_multiplier): steps}`` (cyclic Poisson: cycles).
        epoch_noise: the noise multiplier of each cyclic/shuffled epoch started.
        delta: target delta, 0 < delta < 1.
        mechanism: "pld" (dp_accounting PLDAccountant) or "rdp" (RdpAccountant).
        neighboring: "add_remove", "zero_out" (the same numbers: sensitivity C) or "replace_one".
        truncated: ``{(N, q, K, noise_multiplier): steps}`` of truncated Poisson steps; PLD only.

    Returns:
        epsilon (``math.inf`` if some step had no noise).

    Raises:
        ValueError: truncated Poisson steps with ``mechanism="rdp"`` (dp_accounting's RDP
            accountant does not support ``TruncatedSubsampledGaussianDpEvent``).
    """
    delta = check_delta(delta)
    check_choice("mechanism", mechanism, MECHANISMS)
    check_choice("neighboring", neighboring, NEIGHBORINGS)
    runs = {key: n for key, n in poisson.items() if n > 0 and key[0] > 0}
    cut = {key: n for key, n in (truncated or {}).items() if n > 0 and key[1] > 0}
    if cut:
        refuse_truncation_under_rdp(mechanism)
    if (any(sigma == 0 for _, sigma in runs) or any(s == 0 for s in epoch_noise)
            or any(key[3] == 0 for key in cut)):
        return math.inf
    gaussian_sigma = _merged_gaussian_sigma(epoch_noise) if epoch_noise else None
    if not runs and gaussian_sigma is None and not cut:
        return 0.0

    if mechanism == "rdp" and neighboring == "replace_one":
        return _rdp_replace_one_epsilon(runs, gaussian_sigma, delta)

    if mechanism == "pld":
        return _pld_epsilon(runs, gaussian_sigma, delta, neighboring, cut)
    events: list[dp_accounting.DpEvent] = []
    if runs:
        events.append(_poisson_event(runs))
    if gaussian_sigma is not None:
        events.append(dp_accounting.GaussianDpEvent(gaussian_sigma))
    accountant = dp_rdp.RdpAccountant()  # add/remove
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


def _pld_epsilon(runs: Mapping[tuple[float, float], int], gaussian_sigma: float | None,
                 delta: float, neighboring: str, truncated=None) -> float:
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
    if not truncated:
        return float(pld.get_epsilon_for_delta(delta))
    epsilons = []
    for extra in (0, 1):  # the run's N examples, or N + 1 with an added one (module docstring)
        total = pld
        for key, count in sorted(truncated.items()):
            total = total.compose(_truncated_pld(_truncated_event(key, extra), neighboring)
                                  .self_compose(count))
        epsilons.append(float(total.get_epsilon_for_delta(delta)))
    return max(epsilons)


_PLD_DISCRETIZATION = 1e-4  # PLDAccountant's default value_discretization_interval


@functools.lru_cache(maxsize=16)
def _truncated_pld(event: dp_accounting.TruncatedSubsampledGaussianDpEvent, neighboring: str):
    """One truncated Poisson step's PLD, as dp_accounting's PLDAccountant builds it."""
    return dp_pld.privacy_loss_distribution.from_truncated_subsampled_gaussian_mechanism(
        dataset_size=event.dataset_size, sampling_probability=event.sampling_probability,
        truncated_batch_size=event.truncated_batch_size, noise_multiplier=event.noise_multiplier,
        value_discretization_interval=_PLD_DISCRETIZATION,
        neighboring_relation=_NEIGHBOR_REL[neighboring])


@functools.lru_cache(maxsize=32)
def _sampled_gaussian_pld(q: float, sigma: float, neighboring: str):
    """One step's PLD (PLD objects are immutable: compose and self_compose return new ones).

    q = 1 is the plain Gaussian, as PLDAccountant builds it for a ``GaussianDpEvent``.
    """
    return dp_pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma, value_discretization_interval=_PLD_DISCRETIZATION,
        sampling_prob=q, neighboring_relation=_NEIGHBOR_REL[neighboring])

