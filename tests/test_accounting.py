"""Tests for dpfused.accounting: composed and last-iterate epsilon, reports, calibration."""

from __future__ import annotations

import dataclasses
import math
import pickle

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant as OpacusRDP
from scipy import optimize
from scipy.special import logsumexp

from dpfused.accounting import (
    LastIterateUnavailable,
    PrivacyAccountant,
    PrivacyBudgetExhausted,
    PrivacyReport,
    IterateFacts,
    LedgerEntry,
    SampledStep,
    calibrate_noise_multiplier,
    contraction_factors,
    gaussian_rdp_epsilon,
    last_iterate_bound,
    privacy_report,
    window_rho,
)

DELTA = 1e-5
NR = dp_accounting.NeighboringRelation


# ---------------------------------------------------------------------------------------------
# Ledger builders
# ---------------------------------------------------------------------------------------------


def poisson_steps(q: float, sigma: float, steps: int, **kw) -> list[LedgerEntry]:
    per_epoch = max(1, round(1 / q))
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    return [
        LedgerEntry(SampledStep(event=event, sampling="poisson", epoch=k // per_epoch),
                    IterateFacts(position_in_epoch=k % per_epoch, batches_per_epoch=per_epoch, **kw))
        for k in range(steps)
    ]


def cyclic_steps(sigma, epochs: int, m: int, *, extra: int = 0, lr=0.1, weight_decay=0.0,
                 b: int = 8, sampling: str = "cyclic", plain_sgd: bool = True,
                 loss_reduction: str = "mean", clip=1.0) -> list[LedgerEntry]:
    """``epochs`` full epochs of m batches, then ``extra`` steps of a partial epoch.

    ``weight_decay``: lambda, or a tuple of every parameter group's; ``clip``: C, or C_k per step."""
    total = epochs * m + extra
    sigmas = sigma if isinstance(sigma, (list, tuple)) else [sigma] * total
    lrs = lr if isinstance(lr, (list, tuple)) else [lr] * total
    clips = clip if isinstance(clip, (list, tuple)) else [clip] * total
    decays = weight_decay if isinstance(weight_decay, tuple) else (weight_decay,)
    return [
        LedgerEntry(
            SampledStep(event=dp_accounting.GaussianDpEvent(sigmas[k]), sampling=sampling,
                        epoch=k // m, batch_size=b, examples=b),
            IterateFacts(position_in_epoch=k % m, batches_per_epoch=m, learning_rate=lrs[k],
                         weight_decays=decays, loss_reduction=loss_reduction,
                         normalizer=b if loss_reduction == "mean" else 1, max_grad_norm=clips[k],
                         plain_sgd=plain_sgd))
        for k in range(total)
    ]


def formula_rho(entries, *, smoothness: float, shift_factor: float = 1.0) -> float:
    """rho of the worst position, straight from docs/design.md §7.4 in plain floats (no log space):
    phi_k moves by (eta_k/B_norm) times the noised clipped sum, so c_k = max_g |1 - eta_k lambda_g|
    + eta_k (b/B_norm) L, s_k = eta_k sigma_k C_k / B_norm, Delta_k = eta_k C_k / B_norm; each
    appearance t0 opens a window to t1 with w_k = prod_{j=k+1..t1} c_j and
    rho_window = (1/2) (w_t0 Delta_t0)^2 / sum_k w_k^2 s_k^2; a position's rho sums its windows."""
    b = entries[0].sampled.batch_size
    m = entries[0].iterate.batches_per_epoch
    c, s, shift = [], [], []
    for e in entries:
        it = e.iterate
        step = it.learning_rate / it.normalizer
        c.append(max(abs(1 - it.learning_rate * lam) for lam in it.weight_decays)
                 + it.learning_rate * (b / it.normalizer) * smoothness)
        s.append(step * e.sampled.noise_multiplier * it.max_grad_norm)
        shift.append(shift_factor * step * it.max_grad_norm)
    n, worst = len(entries), 0.0
    for p in range(m):
        uses = [k for k in range(n) if entries[k].iterate.position_in_epoch == p]
        total = 0.0
        for i, t0 in enumerate(uses):
            t1 = uses[i + 1] - 1 if i + 1 < len(uses) else n - 1
            w = {k: math.prod(c[k + 1 : t1 + 1]) for k in range(t0, t1 + 1)}
            total += 0.5 * (w[t0] * shift[t0]) ** 2 / sum(w[k] ** 2 * s[k] ** 2
                                                         for k in range(t0, t1 + 1))
        worst = max(worst, total)
    return worst


def accountant_with(records, **kw) -> PrivacyAccountant:
    acc = PrivacyAccountant(**kw)
    for entry in records:
        acc.record(entry.sampled, entry.iterate)
    return acc


def dp_accounting_epsilon(events, *, mechanism: str, relation=NR.ADD_OR_REMOVE_ONE) -> float:
    acc = dp_pld.PLDAccountant(relation) if mechanism == "pld" else dp_rdp.RdpAccountant()
    for event in events:
        acc.compose(event)
    return float(acc.get_epsilon(DELTA))


# ---------------------------------------------------------------------------------------------
# Composed epsilon
# ---------------------------------------------------------------------------------------------


GOLDEN = [
    ("poisson", (256 / 60000, 1.1, 14062), 2.5966, 2.3817),
    ("poisson", (0.004, 1.3, 3750), 0.922, 0.8336),
    ("cyclic", (1.1, 60), 56.95, 54.046),
    ("cyclic", (10.0, 10), 1.3085, 1.1994),
]


@pytest.mark.parametrize("mechanism", ["rdp", "pld"])
@pytest.mark.parametrize("sampling, args, rdp, pld", GOLDEN)
def test_golden_values(mechanism, sampling, args, rdp, pld):
    if sampling == "poisson":
        records = poisson_steps(*args)
    else:
        sigma, epochs = args
        records = cyclic_steps(sigma, epochs, m=3)
    eps = accountant_with(records, mechanism=mechanism).get_epsilon(DELTA)
    expected = rdp if mechanism == "rdp" else pld
    assert eps == pytest.approx(expected, rel=5e-3)


def opacus_epsilon(history) -> float:
    opacus = OpacusRDP()
    opacus.history = list(history)
    return opacus.get_epsilon(DELTA)


@pytest.mark.parametrize(
    "history",
    [
        [(1.1, 256 / 60000, 14062)],
        [(1.3, 0.004, 3750)],
        [(1.0, 0.01, 300), (2.0, 0.05, 200), (1.0, 0.01, 100)],
    ],
)
def test_rdp_equals_opacus(history):
    records = [rec for sigma, q, n in history for rec in poisson_steps(q, sigma, n)]
    ours = accountant_with(records, mechanism="rdp").get_epsilon(DELTA)
    assert ours == pytest.approx(opacus_epsilon(history), rel=1e-6)


def test_rdp_at_fractional_orders_is_conservative_against_opacus():
    """dp_accounting 0.6.0 adds every term of the fractional-order series (Mironov et al. 2019,
    Sec 3.3) where Opacus subtracts the negative ones: its curve at fractional orders is an upper
    bound (e.g. +15% at alpha=1.1 for q=0.01, sigma=0.8), exact at integer orders. When the best
    order is fractional our epsilon is therefore slightly above Opacus', never below."""
    history = [(0.8, 0.01, 300), (1.5, 0.02, 200), (0.8, 0.01, 100)]
    records = [rec for sigma, q, n in history for rec in poisson_steps(q, sigma, n)]
    ours = accountant_with(records, mechanism="rdp").get_epsilon(DELTA)
    opacus = opacus_epsilon(history)
    assert opacus <= ours <= opacus * (1 + 1e-4)


@pytest.mark.parametrize("mechanism", ["rdp", "pld"])
def test_changing_poisson_steps_equal_step_by_step_composition(mechanism):
    params = [(0.05, 2.0), (0.05, 2.0), (0.1, 3.0), (0.05, 2.0), (0.02, 1.5), (0.1, 3.0)]
    records = [rec for q, s in params for rec in poisson_steps(q, s, 1)]
    events = [dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s))
              for q, s in params]
    ours = accountant_with(records, mechanism=mechanism).get_epsilon(DELTA)
    assert ours == pytest.approx(dp_accounting_epsilon(events, mechanism=mechanism), rel=2e-3)


@pytest.mark.parametrize("neighboring", ["zero_out", "replace_one"])
def test_cached_pld_path_is_exactly_dp_accountings_pld_accountant(neighboring):
    # dpfused caches one-step PLDs; the same events through PLDAccountant give the same epsilon.
    records = [*poisson_steps(0.05, 2.0, 30), *poisson_steps(0.02, 1.5, 7),
               *cyclic_steps([4.0, 3.0, 5.0], epochs=1, m=3)]
    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.5)), 7),
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(2.0)), 30),
        dp_accounting.GaussianDpEvent(3.0),
    ]
    reference = dp_pld.PLDAccountant(neighboring_relation={
        "zero_out": NR.ADD_OR_REMOVE_ONE, "replace_one": NR.REPLACE_ONE}[neighboring])
    reference.compose(dp_accounting.ComposedDpEvent(events))
    for _ in range(2):  # the second call hits the cache
        acc = accountant_with(records, mechanism="pld", neighboring=neighboring)
        assert acc.get_epsilon(DELTA) == reference.get_epsilon(DELTA)


@pytest.mark.parametrize("mechanism", ["rdp", "pld"])
@pytest.mark.parametrize("sampling", ["cyclic", "shuffle"])
def test_cyclic_composes_one_gaussian_per_epoch_with_its_smallest_sigma(mechanism, sampling):
    sigmas = [4.0, 3.0, 6.0, 4.0, 4.0, 4.0, 8.0]  # epoch 0 changes sigma; epoch 2 is partial
    records = cyclic_steps(sigmas, epochs=2, m=3, extra=1, sampling=sampling)
    acc = accountant_with(records, mechanism=mechanism)
    assert acc.steps == 7 and acc.epochs_started == 3
    events = [dp_accounting.GaussianDpEvent(s) for s in (3.0, 4.0, 8.0)]
    expected = dp_accounting_epsilon(events, mechanism=mechanism)
    assert acc.get_epsilon(DELTA) == pytest.approx(expected, rel=1e-9 if mechanism == "rdp" else 2e-3)
    # No amplification is ever claimed: the same sigma under Poisson sampling spends far less.
    amplified = accountant_with(poisson_steps(1 / 3, 4.0, 7), mechanism=mechanism).get_epsilon(DELTA)
    assert acc.get_epsilon(DELTA) > amplified


def test_get_epsilon_if_is_one_more_step_and_leaves_the_ledger():
    acc = accountant_with(poisson_steps(0.01, 1.0, 50), mechanism="rdp")
    nxt = poisson_steps(0.01, 0.9, 1)[0]
    prospective = acc.get_epsilon_if(nxt.sampled, DELTA)
    assert acc.steps == 50
    acc.record(nxt.sampled, nxt.iterate)
    assert prospective == acc.get_epsilon(DELTA)


@pytest.mark.parametrize("mechanism", ["rdp", "pld"])
def test_state_dict_round_trips(mechanism):
    records = poisson_steps(0.02, 2.0, 30) + cyclic_steps(3.0, 1, m=4, extra=2)
    acc = accountant_with(records, mechanism=mechanism, neighboring="replace_one")
    state = pickle.loads(pickle.dumps(acc.state_dict()))
    fresh = PrivacyAccountant(mechanism=mechanism, neighboring="replace_one")
    fresh.load_state_dict(state)
    assert fresh.entries == acc.entries and fresh.epochs_started == acc.epochs_started
    assert fresh.get_epsilon(DELTA) == acc.get_epsilon(DELTA)
    with pytest.raises(ValueError, match="neighboring='replace_one' but this accountant uses None"):
        PrivacyAccountant(mechanism=mechanism).load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Phases (issue 25.2): a second data loader counts its epochs from 0 again
# ---------------------------------------------------------------------------------------------


def two_phase_accountant(**kw) -> PrivacyAccountant:
    """One epoch of 3 cyclic batches (sigma 2), a new phase, one epoch of 3 more (sigma 3)."""
    acc = accountant_with(cyclic_steps(2.0, 1, m=3), **kw)
    acc.begin_phase()
    acc.begin_phase()  # idempotent while the new phase has no step
    for entry in cyclic_steps(3.0, 1, m=3):
        acc.record(entry.sampled, entry.iterate)
    return acc


@pytest.mark.parametrize("mechanism", ["rdp", "pld"])
def test_epochs_of_two_phases_are_two_epochs(mechanism):
    acc = two_phase_accountant(mechanism=mechanism)
    assert [e.sampled.phase for e in acc.entries] == [0, 0, 0, 1, 1, 1] and acc.phase == 1
    assert acc.epochs_started == 2
    expected = dp_accounting_epsilon([dp_accounting.GaussianDpEvent(2.0),
                                      dp_accounting.GaussianDpEvent(3.0)], mechanism=mechanism)
    assert acc.get_epsilon(DELTA) == pytest.approx(expected, rel=1e-9 if mechanism == "rdp" else 2e-3)
    assert acc.get_epsilon(DELTA) > accountant_with(cyclic_steps(2.0, 1, m=3),
                                                    mechanism=mechanism).get_epsilon(DELTA)
    empty = PrivacyAccountant()
    empty.begin_phase()
    assert empty.phase == 0


def test_phases_survive_a_state_dict_and_are_inferred_for_older_ledgers():
    acc = two_phase_accountant()
    acc.begin_phase()  # make_private again, nothing trained yet: the next step is phase 2
    fresh = PrivacyAccountant()
    fresh.load_state_dict(pickle.loads(pickle.dumps(acc.state_dict())))
    assert fresh.entries == acc.entries and fresh.phase == 2
    # A ledger saved before phases existed: a step whose (epoch, position) does not come after the
    # one before it was drawn by a new loader.
    legacy = acc.state_dict()
    del legacy["phase"]
    legacy["version"] = 2
    for entry in legacy["entries"]:
        del entry["sampled"]["phase"]
    old = PrivacyAccountant()
    old.load_state_dict(legacy)
    assert [e.sampled.phase for e in old.entries] == [0, 0, 0, 1, 1, 1] and old.phase == 1
    assert old.get_epsilon(DELTA) == acc.get_epsilon(DELTA)
    # A saved phase below a recorded one cannot merge later steps into an earlier run's epochs.
    lowered = {**acc.state_dict(), "phase": 0}
    fresh.load_state_dict(lowered)
    assert fresh.phase == 1


def test_the_accountant_stamps_the_phase():
    acc = two_phase_accountant()
    step = cyclic_steps(3.0, 1, m=3)[0]
    acc.record(dataclasses.replace(step.sampled, phase=7), step.iterate)
    assert acc.entries[-1].sampled.phase == 1
    with pytest.raises(ValueError, match="phase must be >= 0"):
        SampledStep(event=GAUSS, sampling="cyclic", batch_size=4, phase=-1)


def test_last_iterate_refuses_several_phases():
    acc = two_phase_accountant()
    with pytest.raises(LastIterateUnavailable, match="one fixed cyclic order .* 2 phases"):
        acc.get_last_iterate_epsilon(DELTA, smoothness=1.0)
    assert "2 phases" in privacy_report(acc, DELTA, smoothness=1.0).last_iterate_reason


def test_no_steps_and_no_noise():
    assert PrivacyAccountant().get_epsilon(DELTA) == 0.0
    assert accountant_with(poisson_steps(0.1, 0.0, 1)).get_epsilon(DELTA) == math.inf
    assert accountant_with(cyclic_steps(0.0, 1, m=2), mechanism="rdp").get_epsilon(DELTA) == math.inf


# ---------------------------------------------------------------------------------------------
# Replace-one
# ---------------------------------------------------------------------------------------------


def test_what_dp_accounting_rdp_does_under_replace_one():
    """Pins dp_accounting 0.6.0's behaviour that the accountant works around."""
    replace = dp_rdp.RdpAccountant(neighboring_relation=NR.REPLACE_ONE)
    replace.compose(dp_accounting.GaussianDpEvent(1.1))
    add_remove = dp_rdp.RdpAccountant()
    add_remove.compose(dp_accounting.GaussianDpEvent(1.1))
    assert replace.get_epsilon(DELTA) == add_remove.get_epsilon(DELTA)  # relation ignored
    with pytest.raises(dp_accounting.UnsupportedEventError, match="REPLACE_SPECIAL"):
        dp_rdp.RdpAccountant(neighboring_relation=NR.REPLACE_ONE).compose(
            dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)))


@pytest.mark.parametrize("mechanism", ["rdp", "pld"])
def test_replace_one_gaussian_has_sensitivity_two(mechanism):
    replace = accountant_with(cyclic_steps(6.0, 5, m=3), mechanism=mechanism, neighboring="replace_one")
    halved = accountant_with(cyclic_steps(3.0, 5, m=3), mechanism=mechanism)
    assert replace.get_epsilon(DELTA) == pytest.approx(halved.get_epsilon(DELTA), rel=1e-9)


def exact_replace_pair_rdp(q: float, sigma: float, alpha: float) -> float:
    """D_alpha of dp_accounting's replace-one pair (1-q)N(0)+qN(-1) vs (1-q)N(0)+qN(1), numerically."""
    x = np.linspace(-(2 * alpha + 40 * sigma + 5), 2 * alpha + 40 * sigma + 5, 400_001)

    def log_normal(mu):
        return -((x - mu) ** 2) / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))

    log_p = np.logaddexp(math.log1p(-q) + log_normal(0), math.log(q) + log_normal(-1))
    log_r = np.logaddexp(math.log1p(-q) + log_normal(0), math.log(q) + log_normal(1))
    return float((logsumexp(alpha * log_p - (alpha - 1) * log_r) + math.log(x[1] - x[0])) / (alpha - 1))


@pytest.mark.parametrize("q, sigma", [(0.01, 1.0), (0.1, 0.7), (0.5, 2.0), (0.9, 1.0)])
def test_replace_one_poisson_rdp_is_an_upper_bound(q, sigma):
    """The weak-triangle curve is above the exact replace-one Rényi divergence, order by order."""
    orders = np.array([1.5, 2.0, 4.0, 8.0, 16.0])

    def add_remove_curve(at):
        acc = dp_rdp.RdpAccountant(orders=list(at))
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)))
        return acc._rdp

    bound = (orders - 0.5) / (orders - 1) * add_remove_curve(2 * orders) + add_remove_curve(2 * orders - 1)
    exact = np.array([exact_replace_pair_rdp(q, sigma, a) for a in orders])
    assert np.all(bound >= exact * (1 - 1e-9))


@pytest.mark.parametrize("q, sigma, steps", [(256 / 60000, 1.1, 14062), (0.05, 2.0, 100)])
def test_replace_one_poisson_is_above_pld_and_add_remove(q, sigma, steps):
    records = poisson_steps(q, sigma, steps)
    rdp_replace = accountant_with(records, mechanism="rdp", neighboring="replace_one").get_epsilon(DELTA)
    pld_replace = accountant_with(records, mechanism="pld", neighboring="replace_one").get_epsilon(DELTA)
    rdp_add_remove = accountant_with(records, mechanism="rdp").get_epsilon(DELTA)
    assert rdp_replace > pld_replace and rdp_replace > rdp_add_remove
    events = [dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)]
    assert pld_replace == pytest.approx(
        dp_accounting_epsilon(events, mechanism="pld", relation=NR.REPLACE_ONE), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Last-iterate epsilon
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m, epochs", [(1, 1), (1, 4), (5, 1), (5, 3), (12, 2)])
@pytest.mark.parametrize("sigma", [0.7, 3.0])
def test_last_iterate_closed_form_for_c_equal_one(m, epochs, sigma):
    """c = 1, constant eta, add/remove: rho_p = (1/(2 sigma^2)) [(E-1)/m + 1/(m-p+1)] (Feldman Thm 34)."""
    records = cyclic_steps(sigma, epochs, m, lr=0.05)
    bound = accountant_with(records).last_iterate_bound(convex=True)
    expected = [(epochs - 1) / m + 1 / (m - p + 1) for p in range(1, m + 1)]
    np.testing.assert_allclose(np.array(bound.rho_per_position) * 2 * sigma**2, expected, rtol=1e-12)
    assert bound.worst_position == m - 1 and bound.rho == max(bound.rho_per_position)


def test_window_of_length_one_is_a_plain_gaussian():
    sigma = 1.7
    acc = accountant_with(cyclic_steps(sigma, 1, m=1), mechanism="rdp")
    bound = acc.last_iterate_bound(smoothness=5.0)
    assert bound.rho == pytest.approx(1 / (2 * sigma**2), rel=1e-12)
    assert bound.sigma_effective == pytest.approx(sigma, rel=1e-12)
    eps = acc.get_last_iterate_epsilon(DELTA, smoothness=5.0)
    assert eps == pytest.approx(acc.get_epsilon(DELTA), rel=1e-12)
    assert eps == pytest.approx(dp_accounting_epsilon([dp_accounting.GaussianDpEvent(sigma)],
                                                      mechanism="rdp"), rel=1e-12)
    replace = accountant_with(cyclic_steps(sigma, 1, m=1), neighboring="replace_one")
    assert replace.last_iterate_bound(smoothness=5.0).rho == pytest.approx(4 * bound.rho, rel=1e-12)


def brute_force_window(c, s, shift) -> float:
    """min sum_k (1/2) z_k^2 / s_k^2 over shifts z_k >= 0 whose residual, propagated through the
    contractions (r_t0 = shift - z_t0, r_k = c_k r_(k-1) - z_k), stays >= 0 and ends at 0."""
    n = len(c)

    def residuals(z):
        r, out = shift, []
        for k in range(n):
            r = (c[k] * r if k > 0 else r) - z[k]
            out.append(r)
        return np.array(out)

    w_t0 = float(np.prod(c[1:]))
    z0 = np.zeros(n)
    z0[-1] = w_t0 * shift  # feasible: absorb everything at the last step
    result = optimize.minimize(
        lambda z: 0.5 * np.sum(z**2 / s**2), z0, method="SLSQP",
        jac=lambda z: z / s**2,
        bounds=[(0, None)] * n,
        constraints=[{"type": "eq", "fun": lambda z: residuals(z)[-1:]},
                     {"type": "ineq", "fun": lambda z: residuals(z)[:-1]}] if n > 1 else
                    [{"type": "eq", "fun": lambda z: residuals(z)[-1:]}],
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert result.success, result.message
    return float(result.fun)


@pytest.mark.parametrize("seed", range(8))
def test_window_minimum_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 6))
    c = rng.uniform(0.6, 1.8, n)
    c[rng.integers(0, n)] = rng.uniform(1.2, 2.0)  # at least one expansive step (c > 1)
    s = rng.uniform(0.3, 2.0, n)
    shift = float(rng.uniform(0.5, 2.0))
    assert window_rho(c, s, shift) == pytest.approx(brute_force_window(c, s, shift), rel=1e-5)


def test_window_rho_survives_overflow_and_zero_contraction():
    sigma = 2.0
    long_expansive = window_rho(np.full(5000, 3.0), np.full(5000, sigma), 1.0)
    assert long_expansive == pytest.approx(1 / (2 * sigma**2) * (1 - 1 / 9), rel=1e-9)
    assert window_rho(np.array([1.0, 0.0, 1.0]), np.ones(3), 1.0) == 0.0  # constant map erases it
    assert window_rho(np.array([0.0, 1.0]), np.ones(2), 1.0) == pytest.approx(0.25)


def test_contraction_factors():
    eta, lam = np.array([0.1, 0.5]), np.array([0.01, 0.01])
    np.testing.assert_allclose(contraction_factors(eta, lam, smoothness=2.0, convex=False),
                               np.abs(1 - eta * lam) + 2.0 * eta)
    # Convex with eta <= 2/(L + 2 lambda): |1 - eta lambda|; at eta = 2/L weight decay costs more.
    np.testing.assert_allclose(contraction_factors(eta[:1], lam[:1], smoothness=2.0, convex=True),
                               np.abs(1 - eta[:1] * lam[:1]))
    assert contraction_factors(np.array([1.0]), np.array([0.01]), smoothness=2.0, convex=True)[0] > 1
    assert contraction_factors(np.array([0.3]), np.array([0.0]), smoothness=None, convex=True)[0] == 1


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 6),
    epochs=st.integers(1, 4),
    extra=st.integers(0, 5),
    sigma=st.floats(0.5, 5.0),
    lr=st.floats(0.01, 1.0),
    smoothness=st.floats(0.01, 10.0),
    weight_decay=st.sampled_from([0.0, 0.01, 0.5]),
    neighboring=st.sampled_from(["zero_out", "replace_one"]),
)
def test_last_iterate_never_exceeds_composed(m, epochs, extra, sigma, lr, smoothness, weight_decay,
                                             neighboring):
    records = cyclic_steps(sigma, epochs, m, extra=extra % m, lr=lr, weight_decay=weight_decay)
    acc = accountant_with(records, mechanism="rdp", neighboring=neighboring)
    bound = acc.last_iterate_bound(smoothness=smoothness)
    sensitivity = 2.0 if neighboring == "replace_one" else 1.0
    assert bound.rho <= acc.epochs_started * sensitivity**2 / (2 * sigma**2) * (1 + 1e-12)
    assert acc.get_last_iterate_epsilon(DELTA, smoothness=smoothness) <= acc.get_epsilon(DELTA) * (1 + 1e-12)


def test_last_iterate_uses_each_steps_learning_rate():
    lrs = [0.1, 0.2, 0.05, 0.1, 0.3, 0.2]
    records = cyclic_steps(1.5, 2, m=3, lr=lrs)
    bound = accountant_with(records).last_iterate_bound(smoothness=0.7)
    direct = last_iterate_bound(positions=[0, 1, 2, 0, 1, 2], batches_per_epoch=3, learning_rates=lrs,
                                noise_multipliers=[1.5] * 6, weight_decays=[0.0] * 6, batch_size=8,
                                smoothness=0.7)
    assert bound == direct
    c = 1 + 0.7 * np.array(lrs)
    eta, s = np.array(lrs), 1.5 * np.array(lrs) / 8
    expected_p0 = window_rho(c[0:3], s[0:3], eta[0] / 8) + window_rho(c[3:6], s[3:6], eta[3] / 8)
    assert bound.rho_per_position[0] == pytest.approx(expected_p0, rel=1e-12)


# Issue 19.6: the bound must follow what each step did. m = 8 batches of b = 4, 4 epochs, L = 1.
SCALE_RUN = dict(sigma=1.0, epochs=4, m=8, b=4)
HALF = 16  # the step from which a grad-clip scheduler has lowered C from 1 to 0.25


@pytest.mark.parametrize("name, kwargs, same_as", [
    # loss_reduction="sum": the step is eta times the clipped sum (B_norm = 1), so the batch term is
    # (b L)-Lipschitz: c = 1 + eta b L. At eta = 0.2 / b it is the mean run at eta = 0.2 exactly.
    ("sum", dict(loss_reduction="sum", lr=0.05), dict(lr=0.2)),
    # weight decay 5 on weights, 0 on biases: the bias coordinates do not contract, c = 1 + eta L,
    # the run without weight decay (the largest factor counts, not the smallest).
    ("groups", dict(weight_decay=(5.0, 0.0), lr=0.2), dict(lr=0.2)),
    # a scheduler lowers C mid-run: s_k = eta sigma C_k / b is smaller after it, Delta_t0 is not.
    ("clip", dict(clip=[1.0] * HALF + [0.25] * HALF, lr=0.2), None),
])
def test_last_iterate_follows_each_steps_reduction_decays_and_clip(name, kwargs, same_as):
    entries = cyclic_steps(**SCALE_RUN, **kwargs)
    acc = accountant_with(entries, mechanism="rdp")
    rho = acc.last_iterate_bound(smoothness=1.0).rho
    assert rho == pytest.approx(formula_rho(entries, smoothness=1.0), rel=1e-12)
    epsilon = acc.get_last_iterate_epsilon(DELTA, smoothness=1.0)
    assert epsilon == pytest.approx(
        dp_accounting_epsilon([dp_accounting.GaussianDpEvent(1 / math.sqrt(2 * rho))],
                              mechanism="rdp"), rel=1e-12)
    if same_as is not None:
        plain = accountant_with(cyclic_steps(**SCALE_RUN, **same_as))
        assert epsilon == pytest.approx(plain.get_last_iterate_epsilon(DELTA, smoothness=1.0),
                                        rel=1e-12)
    # What 0c36fdd reported, read off the same formula: mean reduction, the largest lambda only, a
    # constant C. Each is below the bound (the under-report of issue 19.6).
    old = cyclic_steps(**SCALE_RUN, lr=kwargs["lr"],
                       weight_decay=max(kwargs.get("weight_decay", (0.0,))))
    assert formula_rho(old, smoothness=1.0) < rho * (1 - 1e-3)


def test_last_iterate_formula_with_everything_changing():
    """Learning rate, sigma, C, three weight decays, a summed loss, a partial epoch, replace-one."""
    rng = np.random.default_rng(3)
    total = 3 * 5 + 2
    entries = cyclic_steps(list(rng.uniform(0.5, 2.0, total)), 3, m=5, extra=2, b=6,
                           lr=list(rng.uniform(0.001, 0.05, total)), weight_decay=(0.5, 0.0, 2.0),
                           loss_reduction="sum", clip=list(rng.uniform(0.1, 2.0, total)))
    acc = accountant_with(entries, neighboring="replace_one")
    bound = acc.last_iterate_bound(smoothness=0.8)
    assert bound.rho == pytest.approx(formula_rho(entries, smoothness=0.8, shift_factor=2.0),
                                      rel=1e-10)


def test_contraction_factors_take_the_worst_group_and_the_gradient_scale():
    eta = np.array([0.1, 0.3])
    groups = [(5.0, 0.0), (1.0, 2.0)]
    smooth = contraction_factors(eta, groups, smoothness=2.0, convex=False, gradient_scales=[4, 1])
    np.testing.assert_allclose(smooth, [max(abs(1 - 0.5), 1.0) + 0.1 * 4 * 2.0,
                                        max(abs(1 - 0.3), abs(1 - 0.6)) + 0.3 * 2.0])
    # Convex: the Hessian lies in [lambda_min, lambda_max + L_k], L_k = (b / B_norm) L.
    convex = contraction_factors(eta, groups, smoothness=2.0, convex=True, gradient_scales=[4, 1])
    np.testing.assert_allclose(convex, [max(1.0, abs(1 - 0.1 * (5.0 + 8.0))),
                                        max(abs(1 - 0.3), abs(1 - 0.3 * 4.0))])
    unknown_l = contraction_factors(eta, groups, smoothness=None, convex=True)
    np.testing.assert_allclose(unknown_l, [max(1.0, 1 + 0.5), max(abs(1 - 0.3), 1 + 0.6)])


def test_convex_learning_rate_limit_counts_the_summed_batch():
    """Under a summed loss eta L_k <= 2 means eta <= 2 / (b L): eta = 0.1 is fine for a mean loss
    with L = 10 and b = 4, not for a summed one."""
    mean = accountant_with(cyclic_steps(1.0, 1, 3, b=4, lr=0.1))
    assert mean.last_iterate_bound(smoothness=10.0, convex=True).rho > 0
    summed = accountant_with(cyclic_steps(1.0, 1, 3, b=4, lr=0.1, loss_reduction="sum"))
    with pytest.raises(LastIterateUnavailable, match="convex=True needs learning rates <= 2/L = "
                                                     r"0.05 \(loss_reduction='sum'"):
        summed.last_iterate_bound(smoothness=10.0, convex=True)


def test_ledger_without_the_step_scale_is_refused_for_the_last_iterate():
    """A ledger saved before dpfused recorded B_norm and C (one 'weight_decay', the largest): its
    composed epsilon stands, the last-iterate bound is refused with the reason."""
    acc = accountant_with(cyclic_steps(1.0, 2, m=3))
    state = acc.state_dict()
    for entry in state["entries"]:
        it = entry["iterate"]
        it["weight_decay"] = max(it.pop("weight_decays"))
        for key in ("loss_reduction", "normalizer", "max_grad_norm"):
            del it[key]
    old = PrivacyAccountant()
    old.load_state_dict(state)
    assert old.get_epsilon(DELTA) == acc.get_epsilon(DELTA)
    with pytest.raises(LastIterateUnavailable, match="step 0 has no loss_reduction, normalizer, "
                                                     "max_grad_norm recorded.*older dpfused"):
        old.get_last_iterate_epsilon(DELTA, smoothness=1.0)


LAST_ITERATE_REFUSALS = [
    (poisson_steps(0.1, 1.0, 3, plain_sgd=True, learning_rate=0.1), {"smoothness": 1.0},
     "needs cyclic sampling .* sampling='poisson'"),
    (cyclic_steps(1.0, 1, 3, sampling="shuffle"), {"smoothness": 1.0},
     "needs cyclic sampling .* sampling='shuffle' \\(a fresh permutation"),
    (cyclic_steps(1.0, 1, 3, plain_sgd=False), {"smoothness": 1.0},  # Adam
     "needs plain SGD .*adaptive method such as Adam"),
    (cyclic_steps(1.0, 1, 3, plain_sgd=False), {"smoothness": 1.0},  # SGD with momentum
     "needs plain SGD \\(torch.optim.SGD with momentum=0, nesterov=False\\)"),
    (cyclic_steps(1.0, 1, 3), {}, "needs the smoothness constant L > 0 .*smoothness=None"),
    (cyclic_steps(1.0, 1, 3), {"smoothness": 0.0}, "needs the smoothness constant L > 0 .*smoothness=0.0"),
    (cyclic_steps(1.0, 1, 3, lr=[0.1, None, 0.1]), {"smoothness": 1.0},
     "needs every learning rate; step 1 has none"),
    (cyclic_steps(1.0, 1, 3, lr=0.5), {"smoothness": 10.0, "convex": True},
     "convex=True needs learning rates <= 2/L = 0.2; step 0 used 0.5"),
    (cyclic_steps(1.0, 1, 3), {"smoothness": 0.0, "convex": True}, "smoothness must be > 0 when given"),
    (cyclic_steps(1.0, 1, 2) + cyclic_steps(1.0, 1, 2, b=9), {"smoothness": 1.0},
     "one fixed batch size"),
]


@pytest.mark.parametrize("records, kwargs, message", LAST_ITERATE_REFUSALS)
def test_last_iterate_refusals(records, kwargs, message):
    acc = accountant_with(records)
    with pytest.raises(LastIterateUnavailable, match=message) as info:
        acc.get_last_iterate_epsilon(DELTA, **kwargs)
    assert isinstance(info.value, ValueError) and info.value.reason == str(info.value)
    report = privacy_report(acc, DELTA, **kwargs) if kwargs else privacy_report(acc, DELTA)
    assert report.last_iterate_epsilon is None and report.last_iterate_reason


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def test_privacy_report_cyclic():
    acc = accountant_with(cyclic_steps(1.3, 3, m=5, b=16), mechanism="rdp")
    report = privacy_report(acc, DELTA, smoothness=2.0)
    assert isinstance(report, PrivacyReport)
    assert report.composed_epsilon == acc.get_epsilon(DELTA)
    assert report.last_iterate_epsilon == acc.get_last_iterate_epsilon(DELTA, smoothness=2.0)
    assert report.last_iterate_reason is None and report.last_iterate_worst_position == 4
    assert (report.steps, report.epochs, report.sampling, report.batch_size) == (15, 3, "cyclic", 16)
    assert (report.noise_multiplier, report.neighboring, report.accountant) == (1.3, "zero_out", "rdp")
    assert report.sample_rate is None and report.delta == DELTA
    joined = " | ".join(report.assumptions)
    for phrase in ("only the final model is released", "L-smooth with L=2", "plain SGD",
                   "fixed cyclic order"):
        assert phrase in joined
    text = str(report)
    assert "composed epsilon" in text and "last-iterate epsilon" in text and "cyclic, batch size 16" in text


def test_privacy_report_poisson_explains_missing_last_iterate():
    acc = accountant_with(poisson_steps(0.01, 1.0, 20))
    report = privacy_report(acc, DELTA, smoothness=1.0)
    assert report.last_iterate_epsilon is None and "cyclic sampling" in report.last_iterate_reason
    assert report.sample_rate == 0.01 and report.batch_size is None
    assert "n/a" in str(report)
    cyclic = accountant_with(cyclic_steps(1.0, 1, m=2))
    assert "needs the smoothness constant" in privacy_report(cyclic, DELTA).last_iterate_reason


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


def assert_conservative_and_tight(sigma, epsilon_of, target):
    assert epsilon_of(sigma) <= target
    assert epsilon_of(sigma * (1 - 2e-3)) > target


def test_calibrate_poisson_rdp_recovers_the_golden_sigma():
    kw = dict(sampling="poisson", sample_rate=256 / 60000, steps=14062, mechanism="rdp")
    sigma = calibrate_noise_multiplier(target_epsilon=2.5966, delta=DELTA, **kw)
    assert sigma == pytest.approx(1.1, rel=2e-3)
    assert_conservative_and_tight(
        sigma, lambda s: accountant_with(poisson_steps(256 / 60000, s, 14062), mechanism="rdp")
        .get_epsilon(DELTA), 2.5966)
    by_epochs = calibrate_noise_multiplier(target_epsilon=0.922, delta=DELTA, sampling="poisson",
                                           batch_size=240, num_samples=60000, epochs=15,
                                           mechanism="rdp")
    assert by_epochs == pytest.approx(1.3, rel=2e-3)


def test_calibrate_cyclic_pld():
    sigma = calibrate_noise_multiplier(target_epsilon=1.1994, delta=DELTA, sampling="cyclic", epochs=10)
    assert sigma == pytest.approx(10.0, rel=2e-3)
    assert_conservative_and_tight(
        sigma, lambda s: accountant_with(cyclic_steps(s, 10, m=2)).get_epsilon(DELTA), 1.1994)


def test_calibrate_shuffle_from_steps_counts_started_epochs():
    # 100 examples, batch 10: 10 batches per epoch; 25 steps start 3 epochs.
    sigma = calibrate_noise_multiplier(target_epsilon=3.0, delta=DELTA, sampling="shuffle", steps=25,
                                       num_samples=100, batch_size=10, mechanism="rdp",
                                       neighboring="replace_one")
    expected = calibrate_noise_multiplier(target_epsilon=3.0, delta=DELTA, sampling="shuffle",
                                          epochs=3, mechanism="rdp", neighboring="replace_one")
    assert sigma == expected


def test_calibrate_last_iterate():
    spec = {"smoothness": 1.0, "learning_rate": 0.2, "weight_decay": 0.01}
    sigma = calibrate_noise_multiplier(target_epsilon=2.0, delta=DELTA, sampling="cyclic",
                                       num_samples=64, batch_size=8, epochs=4, last_iterate=spec)

    def last_eps(s):
        records = cyclic_steps(s, 4, m=8, lr=0.2, weight_decay=0.01)
        return accountant_with(records).get_last_iterate_epsilon(DELTA, smoothness=1.0)

    assert_conservative_and_tight(sigma, last_eps, 2.0)
    composed = calibrate_noise_multiplier(target_epsilon=2.0, delta=DELTA, sampling="cyclic",
                                          epochs=4, mechanism="rdp")
    assert sigma < composed


@pytest.mark.parametrize("spec, run", [
    ({"loss_reduction": "sum", "learning_rate": 0.05}, dict(loss_reduction="sum", lr=0.05)),
    ({"weight_decay": [5.0, 0.0], "learning_rate": 0.2}, dict(weight_decay=(5.0, 0.0), lr=0.2)),
])
def test_calibrate_last_iterate_for_a_summed_loss_and_weight_decay_groups(spec, run):
    """Issue 19.6: calibration used the mean-loss step and one lambda, and under-noised."""
    sigma = calibrate_noise_multiplier(target_epsilon=3.0, delta=DELTA, sampling="cyclic",
                                       num_samples=32, batch_size=4, epochs=4,
                                       last_iterate={"smoothness": 1.0, **spec})

    def last_eps(s):
        entries = cyclic_steps(s, 4, m=8, b=4, **run)
        rho = formula_rho(entries, smoothness=1.0)
        return dp_accounting_epsilon([dp_accounting.GaussianDpEvent(1 / math.sqrt(2 * rho))],
                                     mechanism="rdp")

    assert_conservative_and_tight(sigma, last_eps, 3.0)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"last_iterate": {"smoothness": 1.0, "learning_rate": 0.1, "lr_schedule": "cosine"}},
         ValueError, "last_iterate: unknown keys \\['lr_schedule'\\]"),
        ({"last_iterate": {"smoothness": 1.0, "learning_rate": 0.1, "loss_reduction": "max"}},
         ValueError, "last_iterate\\['loss_reduction'\\] must be one of \\('mean', 'sum'\\)"),
        ({"target_epsilon": 0.0}, ValueError, "target_epsilon must be a finite number > 0, got 0.0"),
        ({"target_epsilon": -1.0}, ValueError, "target_epsilon must be a finite number > 0"),
        ({"delta": 0.0}, ValueError, "delta must be in \\(0, 1\\), got 0.0"),
        ({"mechanism": "moments"}, ValueError, "mechanism must be one of \\('pld', 'rdp'\\), got 'moments'"),
        ({"neighboring": "swap"}, ValueError,
         "neighboring must be one of \\('add_remove', 'zero_out', 'replace_one'\\), got 'swap'"),
        ({"sampling": "uniform"}, ValueError, "sampling must be one of"),
        ({"sampling": "shuffle", "last_iterate": {"smoothness": 1.0, "learning_rate": 0.1}},
         LastIterateUnavailable, "needs cyclic sampling .* sampling='shuffle'"),
        ({"sampling": "poisson", "sample_rate": 0.1, "last_iterate": {"smoothness": 1.0}},
         LastIterateUnavailable, "needs cyclic sampling .* sampling='poisson'"),
        ({"sampling": "poisson", "epochs": None}, ValueError, "needs steps or epochs"),
        ({"sampling": "cyclic", "epochs": None}, ValueError, "needs epochs, or steps with"),
    ],
)
def test_calibrate_refusals(kwargs, error, message):
    base = dict(target_epsilon=1.0, delta=DELTA, sampling="cyclic", num_samples=64, batch_size=8,
                epochs=2)
    with pytest.raises(error, match=message):
        calibrate_noise_multiplier(**{**base, **kwargs})


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 1.5])
def test_delta_out_of_range(delta):
    acc = accountant_with(cyclic_steps(1.0, 1, m=2))
    calls = [
        lambda: acc.get_epsilon(delta),
        lambda: acc.get_epsilon_if(cyclic_steps(1.0, 1, m=2)[0].sampled, delta),
        lambda: acc.get_last_iterate_epsilon(delta, smoothness=1.0),
        lambda: privacy_report(acc, delta),
        lambda: gaussian_rdp_epsilon(0.1, delta),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=f"delta must be in \\(0, 1\\), got {delta!r}"):
            call()


def test_unknown_accountant_or_neighboring():
    with pytest.raises(ValueError, match="mechanism must be one of \\('pld', 'rdp'\\), got 'prv'"):
        PrivacyAccountant(mechanism="prv")
    with pytest.raises(ValueError,
                       match="neighboring must be one of \\('add_remove', 'zero_out', 'replace_one'\\), got 'swap'"):
        PrivacyAccountant(neighboring="swap")


GAUSS = dp_accounting.GaussianDpEvent(1.0)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SampledStep(event=GAUSS, sampling="uniform", batch_size=4), "sampling must be one of"),
        (lambda: SampledStep(event=GAUSS, sampling="poisson"),
         "sampling='poisson' needs PoissonSampledDpEvent"),
        (lambda: SampledStep(event=GAUSS, sampling="cyclic"), "needs batch_size >= 1"),
        (lambda: SampledStep(event=dp_accounting.GaussianDpEvent(-1.0), sampling="cyclic", batch_size=4),
         "noise multiplier must be >= 0"),
        (lambda: SampledStep(event=dp_accounting.PoissonSampledDpEvent(1.5, GAUSS), sampling="poisson"),
         "sample rate must be in \\[0, 1\\]"),
        (lambda: IterateFacts(position_in_epoch=3, batches_per_epoch=3),
         "0 <= position_in_epoch < batches_per_epoch"),
    ],
)
def test_ledger_record_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_record_type_and_budget_error():
    with pytest.raises(TypeError, match="expects a SampledStep"):
        PrivacyAccountant().record({"noise_multiplier": 1.0})
    assert issubclass(PrivacyBudgetExhausted, RuntimeError)


def test_add_remove_is_refused_for_cyclic_and_shuffled_steps():
    step = cyclic_steps(1.0, 1, m=2)[0]
    with pytest.raises(ValueError, match="neighboring='add_remove' is not proven for sampling='cyclic'"
                                         ".*zero_out"):
        PrivacyAccountant(neighboring="add_remove").record(step.sampled, step.iterate)


def test_budget_screen_agrees_with_the_exact_check():
    """epsilon_if_over_budget may skip PLD only when RDP (also an upper bound) is within budget."""
    accountant = PrivacyAccountant(mechanism="pld")
    rec = poisson_steps(0.05, 1.0, 1)[0].sampled
    for _ in range(200):
        accountant.record(rec)
    exact = accountant.get_epsilon_if(rec, 1e-5)
    assert accountant.epsilon_if_over_budget(rec, 1e-5, exact * 1.5) is None
    assert accountant.epsilon_if_over_budget(rec, 1e-5, exact * 0.9) == pytest.approx(exact)
    # between PLD and RDP: the screen fails, the exact check decides (within budget)
    assert accountant.epsilon_if_over_budget(rec, 1e-5, exact * 1.0001) is None
