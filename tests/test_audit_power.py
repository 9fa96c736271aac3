"""What an audit could have caught (issue 28): its ceiling, its power, the warning when it is
blind, and the README's recommended settings against the leaky doubles.

The doubles are tests/test_audit.py's: the noise std divided by 3 while the accountant records
sigma, and a Poisson sampler that puts every example in every batch while the accountant uses q.
"""

import math
import warnings

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant

from dpfused import audit, privacy_math
from tests.test_audit import _setup, sampler_ignores_q  # noqa: F401 (a fixture, used by name)

NUM_REAL = 16  # _setup's real examples


@pytest.fixture
def noise_divided_by_3(monkeypatch):
    correct = privacy_math.noise_std
    monkeypatch.setattr(privacy_math, "noise_std", lambda *args, **kw: correct(*args, **kw) / 3)


def _poisson_epsilon(q, sigma, steps, delta):
    accountant = PLDAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return accountant.get_epsilon(delta)


# ---------------------------------------------------------------------------------------------
# The issue: a default-size audit passed the noise divided by 3 and called it consistent
# ---------------------------------------------------------------------------------------------

# Issue 28's setting: Poisson q = 1/2 (508 of 16 + 1000), one step, sigma = 2, 1000 canaries.
ISSUE = dict(batch_size=508, steps=1, canaries=1000, noise_multiplier=2.0, sampling="poisson")


def test_a_pass_says_what_it_could_not_see(noise_divided_by_3):
    with pytest.warns(UserWarning, match="too weak for this claim"):
        report = audit.audit_privacy(**_setup(), **ISSUE, seed=0)
    true_epsilon = _poisson_epsilon(0.5, 2.0 / 3, 1, 1e-5)  # what the double really releases
    assert not report.exceeds_claim  # the bug passes at this size, as the issue found
    assert report.blind
    # ...but the report says so: a leak this large is below what it can detect.
    assert report.detectable_noise_multiplier < 2.0 / 3
    assert report.detectable_epsilon > true_epsilon > 3 * report.claimed_epsilon
    assert report.claimed_epsilon < report.ceiling == pytest.approx(
        audit.one_run_ceiling(canaries=1000, delta=1e-5, confidence=0.95))
    text = str(report)
    assert "could not have seen more: a run leaking up to epsilon" in text and "WARNING" in text
    assert "consistent with it" in text and "ceiling" in text
    for lever in ("more canaries", "canary gradient", "every canary in every step",
                  "fewer steps per canary"):
        assert lever in text


def test_trials_pass_says_what_it_could_not_see(noise_divided_by_3):
    with pytest.warns(UserWarning, match="more runs"):
        report = audit.audit_privacy(**_setup(), batch_size=NUM_REAL + 1, steps=1, trials=80,
                                     method="trials", sampling="cyclic", noise_multiplier=2.0,
                                     seed=0)
    assert not report.exceeds_claim and report.blind
    assert report.ceiling == pytest.approx(
        audit.trials_ceiling(trials=80, delta=1e-5, confidence=0.95))
    assert report.detectable_noise_multiplier < 2.0 / 3


def test_a_warning_when_the_ceiling_is_below_the_claim():
    # Two Gaussian epochs at sigma = 1 claim ~6.6; 100 canaries can never certify that much.
    with pytest.warns(UserWarning, match="at or below the claim"):
        report = audit.audit_privacy(**_setup(), batch_size=NUM_REAL + 100, steps=2,
                                     canaries=100, noise_multiplier=1.0, sampling="cyclic",
                                     seed=0)
    assert report.ceiling < report.claimed_epsilon
    assert math.isinf(report.detectable_epsilon) and report.detectable_noise_multiplier == 0.0
    assert "no run of this configuration" in str(report)


# ---------------------------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------------------------


def test_one_run_ceiling_is_the_bound_when_every_guess_is_right():
    m = 1000
    included = np.random.default_rng(0).permutation(np.arange(m) < m // 2)
    perfect, _, _ = audit.epsilon_from_guesses(scores=included.astype(float), included=included,
                                               delta=1e-5, confidence=0.95)
    assert perfect == pytest.approx(audit.one_run_ceiling(canaries=m, delta=1e-5,
                                                          confidence=0.95), rel=1e-9)
    for seed in range(5):  # and no scores do better
        scores = np.random.default_rng(seed).normal(size=m) + 3 * included
        bound, _, _ = audit.epsilon_from_guesses(scores=scores, included=included, delta=1e-5,
                                                 confidence=0.95)
        assert bound <= perfect


def test_one_run_ceiling_falls_once_canaries_times_delta_grows():
    # The theorem's delta term is 2 m delta: past ~0.03 / delta canaries the ceiling drops.
    ceilings = [audit.one_run_ceiling(canaries=m, delta=1e-5, confidence=0.95)
                for m in (1000, 3000, 30_000)]
    assert ceilings[0] < ceilings[1] and ceilings[2] < ceilings[1]


def test_trials_ceiling_is_the_bound_of_a_perfect_test():
    scores_in, scores_out = 1000.0 + np.arange(100), np.arange(100.0)
    perfect = audit.epsilon_from_scores(scores_in=scores_in, scores_out=scores_out, delta=1e-5,
                                        confidence=0.95)
    assert perfect == pytest.approx(audit.trials_ceiling(trials=200, delta=1e-5,
                                                         confidence=0.95), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# The power model
# ---------------------------------------------------------------------------------------------


def test_one_run_p_value_falls_with_the_correct_guesses():
    # _least_correct_to_exceed bisects on it.
    for m, r, eps, delta in ((1000, 200, 1.5, 1e-5), (2000, 1000, 2.0, 1e-5), (500, 50, 0.5, 1e-3)):
        p = [audit.one_run_p_value(canaries=m, guesses=r, correct=v, epsilon=eps, delta=delta)
             for v in range(r + 1)]
        assert all(a >= b for a, b in zip(p, p[1:]))


def test_one_run_verdict_is_the_audits_own_decision():
    rng = np.random.default_rng(0)
    m, claim = 2000, 1.2
    verdict = audit._OneRunVerdict(canaries=m, claim=claim, delta=1e-5, confidence=0.95)
    decisions = []
    for signal in np.linspace(0.0, 4.0, 17):
        included = verdict.draw_included(rng)
        scores = rng.normal(size=m) + signal * included
        bound, _, _ = audit.epsilon_from_guesses(scores=scores, included=included, delta=1e-5,
                                                 confidence=0.95)
        decisions.append(bound > claim)
        assert verdict.exceeds(scores, included, rng) == (bound > claim)
    assert not decisions[0] and decisions[-1]  # both outcomes were checked


def test_power_is_monotone_in_the_noise_and_sound_at_the_claim():
    view = audit._CanaryView(steps=1, amplitude=1.0, noise_multiplier=2.0, presence=None,
                             count_values=np.array([1]), count_probs=np.array([1.0]))
    claim = 1.993  # the Gaussian mechanism at sigma = 2, delta = 1e-5
    verdict = audit._OneRunVerdict(canaries=1000, claim=claim, delta=1e-5, confidence=0.95)
    flags = [audit._flag_probability(view, noise, verdict, seed=0)
             for noise in (0.5, 0.7, 0.8, 1.0, 2.0)]
    assert flags == sorted(flags, reverse=True)
    assert flags[0] == 1.0 and flags[-1] <= 0.05  # honest runs are flagged at most 1 - confidence


@pytest.mark.long
def test_power_model_predicts_the_real_audit(monkeypatch):
    """The model's flag probability against the real audit's flag rate over 12 seeds."""
    settings = dict(batch_size=NUM_REAL + 500, steps=1, canaries=500, noise_multiplier=2.0,
                    sampling="cyclic")
    correct = privacy_math.noise_std
    honest = audit._run(audit._RunConfig(
        **{k: v for k, v in _setup().items() if k != "delta"}, delta=1e-5,
        batch_size=settings["batch_size"], steps=1, noise_multiplier=2.0, clipping="flat",
        sampling="cyclic", accountant="pld", canary_norm=1000.0), np.zeros(500, bool), seed=0)
    verdict = audit._OneRunVerdict(canaries=500, claim=honest.claimed_epsilon, delta=1e-5,
                                   confidence=0.95)
    for divisor in (2.5, 3.0, 4.0):
        predicted = audit._flag_probability(honest.view, 2.0 / divisor, verdict, seed=1)
        monkeypatch.setattr(privacy_math, "noise_std",
                            lambda *a, d=divisor, **kw: correct(*a, **kw) / d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rate = np.mean([audit.audit_privacy(**_setup(), **settings, seed=seed).exceeds_claim
                            for seed in range(12)])
        assert abs(rate - predicted) <= 0.35, (divisor, rate, predicted)


# ---------------------------------------------------------------------------------------------
# The README's recommended settings (measured by benchmarks/audit_power.py)
# ---------------------------------------------------------------------------------------------

# Noise: every canary in every step (cyclic, one batch per epoch), one step, 1000 canaries.
EVERY_STEP = dict(method="one_run", canaries=1000, sampling="cyclic",
                  batch_size=NUM_REAL + 1000, steps=1, noise_multiplier=2.0, clipping="flat")
# Sampling and noise: Poisson q = 0.2, four steps, 5000 canaries (2000 caught 10 of 10 seeds when
# measured, but sits at the edge: after the float64 Poisson draws changed the batches, seed 0 fell
# just short; the README recommends 5000 for that margin).
POISSON = dict(method="one_run", canaries=5000, sampling="poisson",
               batch_size=round(0.2 * (NUM_REAL + 5000)), steps=4, noise_multiplier=2.0,
               clipping="flat")


@pytest.mark.parametrize("settings", [EVERY_STEP, POISSON], ids=["every_step", "poisson"])
def test_recommended_settings_catch_the_noise_divided_by_3(noise_divided_by_3, settings):
    report = audit.audit_privacy(**_setup(), **settings, seed=0)
    assert report.exceeds_claim, str(report)


def test_recommended_poisson_settings_catch_a_sampler_that_ignores_q(sampler_ignores_q):
    report = audit.audit_privacy(**_setup(), **POISSON, seed=0)
    assert report.exceeds_claim, str(report)


@pytest.mark.parametrize("settings", [EVERY_STEP, POISSON], ids=["every_step", "poisson"])
def test_recommended_settings_pass_dpfused_and_are_not_blind(settings):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "too weak" warning
        report = audit.audit_privacy(**_setup(), **settings, seed=0)
    assert not report.exceeds_claim and not report.blind
    assert report.detectable_noise_multiplier > 2.0 / 3  # noise / 3 is within reach
