"""dpfused.audit: the bound functions against known values, and audits of real and broken steps.

A correct run must audit below its claim; a deliberately broken test double (noise scaled down 10x,
or a Poisson sampler that ignores q) must audit above it. Everything is seeded.
"""

import dataclasses
import math

import dp_accounting
import numpy as np
import pytest
import torch
import torch.nn as nn
from dp_accounting.pld import PLDAccountant
from scipy import optimize, stats
from torch.utils.data import TensorDataset

from dpfused import audit, privacy_math
from dpfused.sampling import PoissonBatchSampler

# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (17, 250), (249, 250)])
@pytest.mark.parametrize("confidence", [0.9, 0.975])
def test_clopper_pearson_matches_scipy_binomtest(k, n, confidence):
    lower = stats.binomtest(k, n, alternative="greater").proportion_ci(
        confidence_level=confidence, method="exact").low
    upper = stats.binomtest(k, n, alternative="less").proportion_ci(
        confidence_level=confidence, method="exact").high
    assert audit.clopper_pearson(k, n, confidence=confidence, side="lower") == pytest.approx(
        lower, abs=1e-12)
    assert audit.clopper_pearson(k, n, confidence=confidence, side="upper") == pytest.approx(
        upper, abs=1e-12)


def test_epsilon_from_counts_is_the_stated_formula():
    eps = audit.epsilon_from_counts(true_positives=90, positives=100, false_positives=5,
                                    negatives=100, delta=1e-3, confidence=0.95)
    tpr_lo = stats.binomtest(90, 100, alternative="greater").proportion_ci(0.975, "exact").low
    fpr_hi = stats.binomtest(5, 100, alternative="less").proportion_ci(0.975, "exact").high
    assert eps == pytest.approx(math.log((tpr_lo - 1e-3) / fpr_hi), rel=1e-12)
    assert audit.epsilon_from_counts(true_positives=0, positives=10, false_positives=0,
                                     negatives=10, delta=1e-3, confidence=0.95) == 0.0


def _gaussian_epsilon(mu, delta):
    """Exact epsilon(delta) of the Gaussian mechanism with mu = 1/sigma (Balle & Wang 2018, Thm 8)."""
    def excess(eps):
        return (stats.norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * stats.norm.cdf(-mu / 2 - eps / mu)
                - delta)
    return optimize.brentq(excess, 0.0, 50.0)


def test_gaussian_epsilon_oracle_agrees_with_dp_accounting():
    accountant = PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(2.0))
    assert _gaussian_epsilon(0.5, 1e-3) == pytest.approx(accountant.get_epsilon(1e-3), rel=1e-3)


def test_threshold_bound_approaches_true_epsilon_of_a_gaussian_mechanism():
    sigma, delta = 2.0, 1e-3
    true = _gaussian_epsilon(1 / sigma, delta)
    rng = np.random.default_rng(1)
    n = 200_000
    lower = audit.epsilon_from_scores(scores_in=rng.normal(1 / sigma, 1, n),
                                      scores_out=rng.normal(0, 1, n), delta=delta, confidence=0.95)
    assert 0.8 * true < lower <= true


def test_threshold_bound_never_exceeds_true_epsilon_over_many_seeds():
    sigma, delta = 1.0, 1e-3
    true = _gaussian_epsilon(1 / sigma, delta)
    for seed in range(30):
        rng = np.random.default_rng(seed)
        lower = audit.epsilon_from_scores(scores_in=rng.normal(1 / sigma, 1, 3000),
                                          scores_out=rng.normal(0, 1, 3000), delta=delta,
                                          confidence=0.95, seed=seed)
        assert 0 < lower <= true


def test_threshold_bound_sees_both_directions():
    rng = np.random.default_rng(0)
    up = audit.epsilon_from_scores(scores_in=rng.normal(3, 1, 2000),
                                   scores_out=rng.normal(0, 1, 2000), delta=1e-5, confidence=0.95)
    down = audit.epsilon_from_scores(scores_in=rng.normal(-3, 1, 2000),
                                     scores_out=rng.normal(0, 1, 2000), delta=1e-5, confidence=0.95)
    assert up > 1.5 and down > 1.5


def _p_value_as_written(m, r, v, eps, delta):
    """Steinke, Nasr & Jagielski (2023), the p-value of their main theorem, loop by loop."""
    q = 1 / (1 + math.exp(-eps))
    tail = stats.binom.sf(v - 1, r, q)
    alpha, below = 0.0, 0.0
    for i in range(1, v + 1):
        below += stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, below / i)
    return min(tail + alpha * delta * 2 * m, 1.0)


@pytest.mark.parametrize("m,r,v,eps,delta", [
    (1000, 100, 80, 1.0, 1e-5), (1000, 100, 100, 3.0, 1e-5), (200, 50, 10, 0.5, 1e-3),
    (10_000, 1000, 700, 0.8, 1e-6), (100, 10, 0, 1.0, 1e-5),
])
def test_one_run_p_value_matches_the_paper(m, r, v, eps, delta):
    assert audit.one_run_p_value(canaries=m, guesses=r, correct=v, epsilon=eps,
                                 delta=delta) == pytest.approx(_p_value_as_written(m, r, v, eps, delta),
                                                               rel=1e-10, abs=1e-300)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_one_run_all_correct_without_delta_is_closed_form(r):
    # P[Binom(r, q) = r] = q^r = alpha  =>  epsilon = logit(alpha^(1/r)).
    q = 0.05 ** (1 / r)
    expected = math.log(q / (1 - q))
    got = audit.epsilon_one_run(canaries=2 * r, guesses=r, correct=r, delta=0.0, confidence=0.95)
    assert got == pytest.approx(expected, rel=1e-9)
    assert audit.one_run_p_value(canaries=2 * r, guesses=r, correct=r, epsilon=got, delta=0.0) < 0.05


def test_one_run_delta_only_lowers_the_bound():
    without = audit.epsilon_one_run(canaries=1000, guesses=200, correct=180, delta=0.0,
                                    confidence=0.95)
    with_delta = audit.epsilon_one_run(canaries=1000, guesses=200, correct=180, delta=1e-4,
                                       confidence=0.95)
    assert 0 < with_delta < without


def test_one_run_bound_on_randomized_response_approaches_its_epsilon():
    eps0 = 1.0
    rng = np.random.default_rng(0)
    included = rng.random(100_000) < 0.5
    right = rng.random(included.size) < 1 / (1 + math.exp(-eps0))  # eps0-DP randomized response
    scores = np.where(included == right, 1.0, -1.0) + rng.normal(0, 1e-9, included.size)
    lower, guesses, correct = audit.epsilon_from_guesses(scores=scores, included=included,
                                                         delta=0.0, confidence=0.95)
    assert 0.9 * eps0 < lower <= eps0
    assert correct <= guesses


# ---------------------------------------------------------------------------------------------
# Audits of dpfused's own steps and of broken doubles
# ---------------------------------------------------------------------------------------------


def _setup(num_real=16, delta=1e-5):
    g = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(num_real, 4, generator=g),
                            torch.randint(0, 2, (num_real,), generator=g))
    return dict(make_model=lambda: nn.Linear(4, 2),
                make_optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
                dataset=dataset, loss_fn=nn.CrossEntropyLoss(reduction="none"),
                max_grad_norm=1.0, delta=delta)


# 16 real examples + 496 canaries = 512: Poisson q = 1/2, cyclic/shuffle 2 batches per epoch.
ONE_RUN = dict(batch_size=256, steps=4, canaries=496, method="one_run")


@pytest.mark.parametrize("clipping", ["flat", "per_layer", "per_device"])
@pytest.mark.parametrize("sampling", ["poisson", "cyclic", "shuffle"])
def test_one_run_audit_of_dpfused_stays_below_the_claim(sampling, clipping):
    # sigma = 2 keeps the accountant's Poisson PLD cheap (its support grows as sigma shrinks).
    report = audit.audit_privacy(**_setup(), **ONE_RUN, noise_multiplier=2.0, sampling=sampling,
                                 clipping=clipping, seed=3)
    assert 0 <= report.epsilon_lower_bound < report.claimed_epsilon


@pytest.fixture
def noise_scaled_down(monkeypatch):
    """A broken release: noise 10x smaller than sigma * C, while the accountant records sigma.

    privacy_math.noise_std is the one place the optimizer's noise std comes from."""
    correct = privacy_math.noise_std
    monkeypatch.setattr(privacy_math, "noise_std", lambda *args, **kw: correct(*args, **kw) / 10)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("sampling", ["poisson", "cyclic", "shuffle"])
def test_one_run_audit_catches_noise_scaled_down(noise_scaled_down, sampling, clipping):
    report = audit.audit_privacy(**_setup(), **ONE_RUN, noise_multiplier=4.0, sampling=sampling,
                                 clipping=clipping, seed=3)
    assert report.exceeds_claim, str(report)


@pytest.fixture
def sampler_ignores_q(monkeypatch):
    """A broken Poisson sampler: every example joins every batch, while the accountant uses q."""
    def everyone(self, generator):
        for _ in range(self.batches_per_epoch):
            torch.rand(self.num_samples, generator=generator)  # the same draws, then ignored
            yield list(range(self.num_samples))

    monkeypatch.setattr(PoissonBatchSampler, "_epoch_batches", everyone)


def test_one_run_audit_catches_sampling_that_ignores_q(sampler_ignores_q):
    report = audit.audit_privacy(**_setup(), batch_size=25, steps=8, canaries=496,
                                 noise_multiplier=2.0, sampling="poisson", seed=3)
    assert report.exceeds_claim, str(report)


def test_one_run_audit_is_not_vacuous():
    # Cyclic, one batch per epoch: every canary is in every step; the claim is 2 Gaussian epochs.
    report = audit.audit_privacy(**_setup(), batch_size=512, steps=2, canaries=496,
                                 noise_multiplier=1.0, sampling="cyclic", seed=3)
    assert 0.5 < report.epsilon_lower_bound < report.claimed_epsilon


# 8 real examples + 1 canary slot, one batch per epoch: the canary is in every step it can be.
# delta = 1e-3 lowers the claim more than the bound, so 80 runs suffice to catch the broken double.
TRIALS = dict(batch_size=9, steps=1, trials=80, method="trials", sampling="cyclic")


def test_trials_audit_of_dpfused_stays_below_the_claim():
    report = audit.audit_privacy(**_setup(8, delta=1e-3), **TRIALS,
                                 noise_multiplier=3.0, seed=5)
    assert report.epsilon_lower_bound < report.claimed_epsilon
    assert report.runs == 80 and report.canaries == 40


def test_trials_audit_catches_noise_scaled_down(noise_scaled_down):
    report = audit.audit_privacy(**_setup(8, delta=1e-3), **TRIALS,
                                 noise_multiplier=3.0, seed=5)
    assert report.exceeds_claim, str(report)


# ---------------------------------------------------------------------------------------------
# The report and the arguments
# ---------------------------------------------------------------------------------------------


def test_report_is_frozen_and_prints_both_numbers():
    report = audit.AuditReport(epsilon_lower_bound=0.5, claimed_epsilon=2.0, delta=1e-5,
                               confidence=0.95, method="one_run", canaries=100, runs=1, steps=4,
                               noise_multiplier=1.5, ceiling=3.25, detectable_epsilon=4.75,
                               detectable_noise_multiplier=0.75, power=0.5, guesses=10, correct=9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.claimed_epsilon = 0.1
    text = str(report)
    assert "0.5" in text and "2" in text and "95%" in text and "does not prove" in text
    assert "ceiling: 3.25" in text and "4.75" in text and "0.75" in text and "50%" in text
    assert not report.blind and "WARNING" not in text  # 0.75 > 1.5 / 3: noise / 3 is seen
    assert "EXCEEDS" in str(dataclasses.replace(report, epsilon_lower_bound=3.0))
    blind = dataclasses.replace(report, detectable_noise_multiplier=0.25)
    assert blind.blind and "WARNING" in str(blind)


@pytest.mark.parametrize("bad,name", [
    (dict(method="both"), "method"), (dict(canaries=1), "canaries"), (dict(trials=7), "trials"),
    (dict(confidence=1.0), "confidence"), (dict(delta=0.0), "delta"), (dict(steps=0), "steps"),
    (dict(power=1.0), "power"), (dict(power=0), "power"),
    (dict(noise_multiplier=0.0), "noise_multiplier"), (dict(loss_fn=None), "loss_fn"),
    (dict(max_grad_norm=[0.5, 0.5]), "max_grad_norm"), (dict(batch_size=0.5), "batch_size"),
])
def test_bad_arguments_are_named(bad, name):
    kwargs = {**_setup(), **ONE_RUN, "noise_multiplier": 1.0, **bad}
    with pytest.raises((ValueError, TypeError), match=name):
        audit.audit_privacy(**kwargs)


def test_float64_model_and_the_callers_rng_untouched():
    setup = _setup()
    setup["make_model"] = lambda: nn.Linear(4, 2).double()
    setup["dataset"] = TensorDataset(setup["dataset"].tensors[0].double(), setup["dataset"].tensors[1])
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    report = audit.audit_privacy(**setup, batch_size=116, steps=1, canaries=100,
                                 noise_multiplier=1.0, sampling="cyclic", seed=0)
    assert torch.equal(torch.rand(3), expected)
    again = audit.audit_privacy(**setup, batch_size=116, steps=1, canaries=100,
                                noise_multiplier=1.0, sampling="cyclic", seed=0)
    assert again == report  # seeded: the same audit twice


def test_loss_fn_must_return_per_example_losses():
    kwargs = {**_setup(), **ONE_RUN, "noise_multiplier": 1.0,
              "loss_fn": nn.CrossEntropyLoss()}  # reduces to a scalar
    with pytest.raises(ValueError, match="reduction='none'"):
        audit.audit_privacy(**kwargs)
