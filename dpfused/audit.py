"""Empirical privacy auditing: a lower bound on epsilon, measured on dpfused's real training steps,
and what the audit could have caught.

The auditor plants white-box gradient canaries (Dirac canaries, Nasr et al. 2023; Steinke, Nasr &
Jagielski 2023) and reads the released (noised) gradient along their directions:

* The model is wrapped with a probe: ``nn.Embedding(m, 1)`` beside the user's model. Canary j is an
  extra example of the dataset whose loss is ``canary_norm`` times the probe's row j and nothing
  else, so its per-example gradient is ``canary_norm * e_j`` on the probe (>> C: clipping leaves
  exactly C_probe * e_j) and zero on the user's model. An *excluded* canary keeps its slot in the
  dataset with scale 0: a null example with zero gradient (zero-out adjacency for cyclic/shuffle,
  and the same released sums as removing it under Poisson, since the normalizer is the expected
  batch size). Canaries therefore change nothing but the probe coordinates, and the sampler sees
  the same dataset whether they are in or out. A lookup costs O(1) per example, so tens of
  thousands of canaries are cheap.
* Training runs through ``PrivacyEngine.make_private`` and ``optimizer.step()`` unchanged; after each
  step the auditor reads ``probe.weight.grad`` (the noised gradient the wrapped optimizer was given).
  Each canary's score is a log-likelihood ratio of its coordinate's observations, computed with the
  *claimed* sigma. Poisson: "present in each step with probability q" against "absent" (the
  schedule is the secret the amplification rests on). Cyclic and shuffle: the claim (one Gaussian
  per epoch, zero-out) holds for a public schedule, so the score uses it: N(a, sigma^2) against
  N(0, sigma^2) over the steps the canary's slot was in. Any score gives a valid bound; these make
  it tight-ish.

Two estimators turn scores into an epsilon lower bound at a stated confidence:

* ``method="trials"``: many independent runs with one canary, included in half of them. A threshold
  test's (TPR, FPR) with one-sided Clopper-Pearson bounds gives epsilon >= log((TPR_lo - delta) /
  FPR_hi) (and the same with the event or the roles of the neighbours swapped). The threshold and
  the test are chosen on one half of the runs and the bound is evaluated on the other half, so the
  choice costs nothing in confidence.
* ``method="one_run"``: one run, m canaries each included with probability 1/2, guesses on the k
  most confident; epsilon is the largest for which that many correct guesses would have p-value
  below 1 - confidence (Steinke, Nasr & Jagielski 2023, arXiv:2305.08846: their main theorem, with
  its delta term). A small grid of k is tried with a Bonferroni correction.

What the audit could have caught (issue 28). Every report carries:

* the *ceiling*: the bound if every guess were right (one_run) or the test perfect (trials). No
  run, however leaky, makes the audit say more. With m canaries it grows like log m until the
  theorem's 2 m delta term takes over (about 0.03 / delta canaries), then falls;
* the *power*: the smallest epsilon it detects, ``detectable_epsilon``: the run released with a
  smaller noise multiplier s (same sampling, steps, amplitude; the accountant's epsilon for it, via
  dp_accounting) is flagged with probability ``power`` (default 1/2). The probability is estimated
  by simulating the audit itself: the released coordinates drawn as the *claimed* mechanism draws
  them at noise s, scored as above, decided by the audit's own guessers or threshold test (200
  simulated audits per s, the same random numbers at every s), and s found by bisection.
  Checked against real audits (tests/test_audit_power.py, benchmarks/audit_power.py).

A passing audit that would more likely than not also have passed the run with the noise divided by
``BLIND_NOISE_DIVISOR`` (3) says so in the report and in a ``UserWarning``, naming what to change.

Reading the result: an audited lower bound *below* the claimed epsilon proves nothing about
correctness (audits are loose, and a bug can hide from a given canary); the power line says how
large a leak could have hidden. A lower bound *above* the claim proves, at the stated confidence,
that the implementation leaks more than it claims: a bug.

Statistics come from scipy (binomial and beta distributions); this module needs ``scipy``
(``pip install dpfused[audit]``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from scipy import stats
from torch.utils.data import DataLoader, Dataset

from dpfused.accounting import PrivacyAccountant, SampledStep
from dpfused.arguments import (
    check_choice,
    check_delta,
    check_integer,
    check_map_style_dataset,
    check_max_grad_norm,
    check_number,
)
from dpfused.engine import PrivacyEngine

__all__ = [
    "BLIND_NOISE_DIVISOR",
    "AuditReport",
    "audit_privacy",
    "clopper_pearson",
    "epsilon_from_counts",
    "epsilon_from_scores",
    "epsilon_one_run",
    "epsilon_from_guesses",
    "one_run_ceiling",
    "one_run_p_value",
    "trials_ceiling",
]

METHODS = ("one_run", "trials")
_MAX_THRESHOLDS = 4096  # candidate thresholds tried on the selection half of the scores


# ---------------------------------------------------------------------------------------------
# Statistics: pure functions of counts and scores
# ---------------------------------------------------------------------------------------------


def clopper_pearson(successes, trials, *, confidence: float, side: str):
    """One-sided exact (Clopper-Pearson) bound on a binomial proportion; vectorized.

    Args:
        successes: k, an int or an integer array.
        trials: n >= 1, broadcast against ``successes``.
        confidence: 1 - alpha: the bound holds with at least this probability.
        side: "lower" (P[p >= bound] >= confidence) or "upper" (P[p <= bound] >= confidence).

    Returns:
        The bound (float or array): the alpha quantile of Beta(k, n - k + 1) for "lower" (0 when
        k = 0), the 1 - alpha quantile of Beta(k + 1, n - k) for "upper" (1 when k = n), which is
        what ``scipy.stats.binomtest(k, n, alternative=...).proportion_ci(method="exact")`` gives.
    """
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    alpha = 1.0 - confidence
    with np.errstate(invalid="ignore"):
        if side == "lower":
            bound = np.where(k > 0, stats.beta.ppf(alpha, k, n - k + 1), 0.0)
        elif side == "upper":
            bound = np.where(k < n, stats.beta.ppf(1.0 - alpha, k + 1, n - k), 1.0)
        else:
            raise ValueError(f"side={side!r}; use 'lower' or 'upper'")
    return float(bound) if bound.ndim == 0 else bound


def epsilon_from_counts(*, true_positives, positives, false_positives, negatives, delta: float,
                        confidence: float):
    """epsilon >= log((TPR_lo - delta) / FPR_hi) for a test that says "in" (vectorized over counts).

    An (epsilon, delta)-DP mechanism gives every test TPR <= e^epsilon FPR + delta. TPR_lo and FPR_hi
    are one-sided Clopper-Pearson bounds at 1 - alpha/2 each, so the bound holds with probability
    at least ``confidence`` = 1 - alpha. Returns 0 where TPR_lo <= delta.
    """
    level = _one_side_level(confidence)
    tpr_lo = clopper_pearson(true_positives, positives, confidence=level, side="lower")
    fpr_hi = clopper_pearson(false_positives, negatives, confidence=level, side="upper")
    eps = _epsilon_of_rates(tpr_lo, fpr_hi, delta)
    return float(eps) if eps.ndim == 0 else eps


def _one_side_level(confidence: float) -> float:
    """Each of the two one-sided bounds of ``epsilon_from_counts`` holds at 1 - alpha / 2."""
    return 1.0 - (1.0 - confidence) / 2.0


def _epsilon_of_rates(tpr_lo, fpr_hi, delta) -> np.ndarray:
    excess = np.asarray(tpr_lo) - delta
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.where(excess > 0, np.log(np.maximum(excess, 1e-300) / fpr_hi), 0.0)
    return np.maximum(eps, 0.0)


@functools.lru_cache(maxsize=64)
def _clopper_pearson_table(trials: int, confidence: float, side: str) -> np.ndarray:
    """``clopper_pearson(k, trials)`` for every k = 0..trials (read-only): a threshold test's
    counts are integers, so a table replaces thousands of beta quantiles per search."""
    table = np.atleast_1d(clopper_pearson(np.arange(trials + 1), trials, confidence=confidence,
                                          side=side))
    table.flags.writeable = False
    return table


def epsilon_from_scores(*, scores_in, scores_out, delta: float, confidence: float,
                        seed: int = 0) -> float:
    """Threshold-test lower bound from scores of runs with (``scores_in``) and without the canary.

    A test is an event E, "score > tau" or "score <= tau", and the neighbour it points to: add/remove
    DP bounds both P[E | in] <= e^eps P[E | out] + delta and the same with in and out exchanged, so
    each of the four (event, neighbour) pairs gives a bound. Half of each group (drawn with
    ``seed``) chooses tau and the pair; the other half evaluates that one test with
    ``epsilon_from_counts``. Choosing on separate data keeps the confidence exact.

    Returns:
        The lower bound on epsilon (>= 0), holding with probability >= ``confidence``.
    """
    scores_in, scores_out = _as_scores(scores_in, "scores_in"), _as_scores(scores_out, "scores_out")
    rng = np.random.default_rng(seed)
    pick_in, eval_in = _halves(scores_in, rng)
    pick_out, eval_out = _halves(scores_out, rng)
    tau, test = _best_threshold(pick_in, pick_out, delta=delta, confidence=confidence)
    return float(_threshold_epsilon(eval_in, eval_out, tau, test, delta, confidence))


# (event E is "score > tau", E's probability is compared with the canary in over out).
_TESTS = ((True, True), (True, False), (False, True), (False, False))


def _as_scores(values, name):
    scores = np.asarray(values, dtype=np.float64).reshape(-1)
    if scores.size < 2 or not np.all(np.isfinite(scores)):
        raise ValueError(f"{name} must hold at least 2 finite scores; got {scores.size} values")
    return scores


def _halves(scores, rng):
    order = rng.permutation(scores.size)
    half = scores.size // 2
    return scores[order[:half]], scores[order[half:]]


def _threshold_epsilon(scores_in, scores_out, tau, test, delta, confidence):
    """The bound of one test (vectorized over an array of thresholds ``tau``)."""
    above, in_over_out = test
    tau = np.asarray(tau, dtype=np.float64)
    hits_in = scores_in.size - np.searchsorted(np.sort(scores_in), tau, side="right")
    hits_out = scores_out.size - np.searchsorted(np.sort(scores_out), tau, side="right")
    if not above:
        hits_in, hits_out = scores_in.size - hits_in, scores_out.size - hits_out
    positive, negative = ((hits_in, scores_in.size), (hits_out, scores_out.size))
    if not in_over_out:
        positive, negative = negative, positive
    # epsilon_from_counts, with its Clopper-Pearson bounds read from tables.
    level = _one_side_level(confidence)
    tpr_lo = _clopper_pearson_table(positive[1], level, "lower")[positive[0]]
    fpr_hi = _clopper_pearson_table(negative[1], level, "upper")[negative[0]]
    eps = _epsilon_of_rates(tpr_lo, fpr_hi, delta)
    return eps.reshape(tau.shape) if eps.ndim else float(eps)


def _best_threshold(scores_in, scores_out, *, delta, confidence):
    candidates = np.unique(np.concatenate([scores_in, scores_out]))
    if candidates.size > _MAX_THRESHOLDS:  # any choice made on this half is valid; keep it cheap
        candidates = np.unique(np.quantile(candidates, np.linspace(0, 1, _MAX_THRESHOLDS)))
    best = (-1.0, float(candidates[0]), _TESTS[0])
    for test in _TESTS:
        eps = _threshold_epsilon(scores_in, scores_out, candidates, test, delta, confidence)
        i = int(np.argmax(eps))
        if eps[i] > best[0]:
            best = (float(eps[i]), float(candidates[i]), test)
    return best[1], best[2]


def one_run_p_value(*, canaries: int, guesses: int, correct: int, epsilon: float,
                    delta: float) -> float:
    """P[at least ``correct`` of ``guesses`` right] under (epsilon, delta)-DP, one-run audit.

    Steinke, Nasr & Jagielski (2023, arXiv:2305.08846), main theorem: with m canaries each included
    independently with probability 1/2 and r guesses, W correct guesses satisfy, for
    q = e^eps / (1 + e^eps),
    P[W >= v] <= P[Binom(r, q) >= v] + 2 m delta * max_{i = 1..v} P[v > Binom(r, q) >= v - i] / i.

    Returns:
        That bound, capped at 1.
    """
    m, r, v = canaries, guesses, correct
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries; got {v}, {r}, {m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomized response
    tail = stats.binom.sf(v - 1, r, q)
    if delta == 0 or v == 0:
        return float(min(tail, 1.0))
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))  # i = 1..v
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return float(min(tail + 2.0 * m * delta * alpha, 1.0))


def epsilon_one_run(*, canaries: int, guesses: int, correct: int, delta: float,
                    confidence: float) -> float:
    """The largest epsilon whose one-run p-value is below 1 - ``confidence`` (0 if none).

    The p-value grows with epsilon, so bisection keeps p(lo) < 1 - confidence throughout and
    returns ``lo``: a conservative value.
    """
    alpha = 1.0 - confidence

    def p_value(eps):
        return one_run_p_value(canaries=canaries, guesses=guesses, correct=correct, epsilon=eps,
                               delta=delta)

    if p_value(0.0) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(hi) < alpha:
        lo, hi = hi, 2.0 * hi
        if hi > 1e3:
            return lo
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if p_value(mid) < alpha else (lo, mid)
    return lo


def epsilon_from_guesses(*, scores, included, delta: float, confidence: float,
                         guess_counts: Sequence[int] | None = None) -> tuple[float, int, int]:
    """One-run lower bound from canary scores (higher = more likely included) and the truth.

    For each k in ``guess_counts`` two guessers are tried: "in" for the k highest scores, and "in"
    for the k/2 highest with "out" for the k/2 lowest. Bonferroni over the 2 * len(guess_counts)
    guessers keeps the overall confidence.

    Returns:
        (epsilon lower bound, guesses, correct guesses) of the best guesser.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    included = np.asarray(included, dtype=bool).reshape(-1)
    m = scores.size
    if included.size != m or m < 2:
        raise ValueError(f"scores and included must have the same length >= 2; got {m} and "
                         f"{included.size}")
    if guess_counts is None:
        guess_counts = _guess_counts(m)
    level = _guesser_level(confidence, guess_counts)
    guessers = _guessers(guess_counts)
    best = (0.0, 0, 0)
    for (top, bottom), correct in zip(guessers, _correct_guesses(scores, included, guessers)):
        eps = epsilon_one_run(canaries=m, guesses=top + bottom, correct=correct, delta=delta,
                              confidence=level)
        if eps > best[0]:
            best = (eps, top + bottom, correct)
    return best


def _guessers(guess_counts: Sequence[int]) -> list[tuple[int, int]]:
    """(top, bottom) per guesser: "in" for the ``top`` highest scores, "out" for the ``bottom``
    lowest; two per guess count k: (k, 0) and (k - k // 2, k // 2)."""
    return [pair for k in guess_counts for pair in ((k, 0), (k - k // 2, k // 2))]


def _correct_guesses(scores: np.ndarray, included: np.ndarray,
                     guessers: Sequence[tuple[int, int]]) -> list[int]:
    """Correct guesses of each guesser (ties broken by index, as a stable sort does)."""
    ranked = included[np.argsort(-scores, kind="stable")]  # most confident "in" first
    m = ranked.size
    in_top = np.concatenate([[0], np.cumsum(ranked)])  # in_top[j]: included among the j highest
    return [int(in_top[top] + bottom - (in_top[m] - in_top[m - bottom]))
            for top, bottom in guessers]


_GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # of the canaries, for the default guessers


def _guess_counts(canaries: int) -> list[int]:
    return sorted({max(1, round(canaries * f)) for f in _GUESS_FRACTIONS})


def _guesser_level(confidence: float, guess_counts: Sequence[int]) -> float:
    """Bonferroni: two guessers per guess count share 1 - confidence."""
    return 1.0 - (1.0 - confidence) / (2 * len(guess_counts))


# ---------------------------------------------------------------------------------------------
# What an audit can see: its ceiling and its power
# ---------------------------------------------------------------------------------------------


def one_run_ceiling(*, canaries: int, delta: float, confidence: float) -> float:
    """The highest bound the one-run audit can return with ``canaries``: every guess right.

    It is the best of ``epsilon_from_guesses``' guessers when all their guesses are correct. The
    theorem's delta term (2 m delta) makes it *fall* once m delta is no longer small: more canaries
    than about 0.03 / delta buy no higher ceiling.
    """
    counts = _guess_counts(canaries)
    level = _guesser_level(confidence, counts)
    return max(epsilon_one_run(canaries=canaries, guesses=k, correct=k, delta=delta,
                               confidence=level) for k in counts)


def trials_ceiling(*, trials: int, delta: float, confidence: float) -> float:
    """The highest bound the trials audit can return: a perfect test on the evaluation half."""
    positives, negatives = _evaluation_sizes(trials)
    return epsilon_from_counts(true_positives=positives, positives=positives, false_positives=0,
                               negatives=negatives, delta=delta, confidence=confidence)


def _evaluation_sizes(trials: int) -> tuple[int, int]:
    """Runs with and without the canary in the half that evaluates the test (see ``_halves``)."""
    with_canary = trials // 2
    without = trials - with_canary
    return with_canary - with_canary // 2, without - without // 2


@dataclass(frozen=True)
class _CanaryView:
    """What one canary's probe coordinate shows over a run, for the power model.

    Attributes:
        steps: logical steps T.
        amplitude: a = C_g / C, the clipped canary in units of C.
        noise_multiplier: the claimed sigma (the score is computed with it).
        presence: Poisson q (the score mixes over presence), or None: the score knows the schedule.
        count_values, count_probs: how many of the T steps a canary's slot is in, as the claimed
            sampling draws it (Binomial(T, q) for Poisson; the fixed order for cyclic; a fresh
            permutation per epoch for shuffle).
    """

    steps: int
    amplitude: float
    noise_multiplier: float
    presence: float | None
    count_values: np.ndarray
    count_probs: np.ndarray


def _simulated_scores(view: _CanaryView, noise_multiplier: float, *, included: bool, size: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Scores of ``size`` canaries, all in or all out, of a run released with ``noise_multiplier``.

    The released coordinates are simulated exactly as the claimed mechanism draws them (the
    canary's slot sampled as the sampler would, Gaussian noise of std ``noise_multiplier`` in units
    of C) and scored exactly as the audit scores the real run (with the claimed sigma).
    """
    counts = rng.choice(view.count_values, size=size, p=view.count_probs)
    a, claimed = view.amplitude, view.noise_multiplier
    if view.presence is None:  # the known-schedule score is a Gaussian sum over present steps
        shift, spread = a * a / (2 * claimed**2), a * noise_multiplier / claimed**2
        mean = counts * shift if included else -counts * shift
        return mean + np.sqrt(counts) * spread * rng.standard_normal(size)
    scores = np.zeros(size)
    for start in range(0, view.steps, _SIMULATED_STEPS_PER_CHUNK):
        steps = np.arange(start, min(start + _SIMULATED_STEPS_PER_CHUNK, view.steps))[:, None]
        # A slot's score is symmetric in the steps: put the steps it is in first.
        signal = a * (steps < counts[None, :]) if included else 0.0
        noise = noise_multiplier * rng.standard_normal((steps.size, size))
        scores += _scores(signal + noise, amplitude=a, sigma=claimed, presence=view.presence)
    return scores


def _score_source(view: _CanaryView, noise_multiplier: float, *, units: int,
                  rng: np.random.Generator) -> Callable[[bool, int], np.ndarray]:
    """``draw(included, n)``: scores for n canaries of one side of a simulated audit.

    Known-schedule scores are Gaussian given the slot's count: drawn fresh for every audit.
    Poisson scores cost ``steps`` draws each: drawn once into a pool per side, ten times the
    audit's size (fewer for very long runs, never under twice it), and resampled (a pool ten
    times the audit adds about a third of an audit's own sampling error to the estimate).
    """
    if view.presence is None:
        return lambda included, n: _simulated_scores(view, noise_multiplier, included=included,
                                                     size=n, rng=rng)
    # Ten times the audit's size, but at most ~_SIMULATED_DRAWS normal draws per side for long
    # runs (never fewer than twice the audit's size).
    size = max(2 * units, min(max(_SIMULATED_SCORES, 10 * units), _SIMULATED_DRAWS // view.steps))
    pools = {side: _simulated_scores(view, noise_multiplier, included=side, size=size, rng=rng)
             for side in (True, False)}
    return lambda included, n: rng.choice(pools[included], n)


_SIMULATED_SCORES = 20_000  # Poisson pools hold at least this many scores per side
_SIMULATED_DRAWS = 40_000_000  # normal draws per side of a Poisson pool, at most
_SIMULATED_AUDITS = 200  # simulated audits per noise level: P[flag] to about +-0.035 at 1/2
_SIMULATED_STEPS_PER_CHUNK = 64
_POWER_SEARCH_FLOOR = 20.0  # the power search stops at the claimed sigma / 20
_POWER_SEARCH_ITERATIONS = 10  # log(20) / 2^10: sigma to 0.3%


def _least_correct_to_exceed(*, canaries, guesses, claim, delta, level) -> float:
    """The fewest correct of ``guesses`` whose one-run bound exceeds ``claim`` (inf: none does).

    The bound exceeds the claim exactly when the p-value at the claim is below 1 - level, and
    that p-value falls as the correct guesses grow: bisect on them.
    """
    alpha = 1.0 - level

    def significant(correct):
        return one_run_p_value(canaries=canaries, guesses=guesses, correct=correct,
                               epsilon=claim, delta=delta) < alpha

    if not significant(guesses):
        return math.inf
    too_few, enough = -1, guesses
    while enough - too_few > 1:
        mid = (too_few + enough) // 2
        too_few, enough = (too_few, mid) if significant(mid) else (mid, enough)
    return enough


class _OneRunVerdict:
    """Whether the one-run audit exceeds ``claim``, from scores and the truth, without computing
    the bound: some guesser has at least the correct guesses that make its bound exceed it."""

    def __init__(self, *, canaries, claim, delta, confidence):
        counts = _guess_counts(canaries)
        level = _guesser_level(confidence, counts)
        self.units = canaries
        self.guessers = _guessers(counts)
        self.least = [_least_correct_to_exceed(canaries=canaries, guesses=top + bottom,
                                               claim=claim, delta=delta, level=level)
                      for top, bottom in self.guessers]

    def draw_included(self, rng) -> np.ndarray:
        return rng.random(self.units) < 0.5

    def exceeds(self, scores, included, rng) -> bool:
        correct = _correct_guesses(scores, included, self.guessers)
        return any(c >= least for c, least in zip(correct, self.least))


class _TrialsVerdict:
    """Whether the trials audit exceeds ``claim``: ``epsilon_from_scores`` itself."""

    def __init__(self, *, trials, claim, delta, confidence):
        self.units, self.claim, self.delta, self.confidence = trials, claim, delta, confidence

    def draw_included(self, rng) -> np.ndarray:
        return rng.permutation(np.arange(self.units) < self.units // 2)

    def exceeds(self, scores, included, rng) -> bool:
        return epsilon_from_scores(scores_in=scores[included], scores_out=scores[~included],
                                   delta=self.delta, confidence=self.confidence,
                                   seed=int(rng.integers(2**31))) > self.claim


def _flag_probability(view: _CanaryView, noise_multiplier: float, verdict, *,
                      seed: int) -> float:
    """P[the audit exceeds the claim] for runs released with ``noise_multiplier``, by simulation.

    Each simulated audit draws the inclusions as the audit does, gives every canary a simulated
    score of its side (``_score_source``) and applies the audit's own decision (``verdict``), so
    guessers, ties and the Bonferroni levels are the audit's. The same ``seed`` at every noise
    level (common random numbers) keeps the estimate falling steadily as the noise grows.
    """
    rng = np.random.default_rng(seed)
    draw = _score_source(view, noise_multiplier, units=verdict.units, rng=rng)
    flagged = 0
    for _ in range(_SIMULATED_AUDITS):
        included = verdict.draw_included(rng)
        scores = np.empty(included.size)
        scores[included] = draw(True, int(included.sum()))
        scores[~included] = draw(False, int((~included).sum()))
        flagged += verdict.exceeds(scores, included, rng)
    return flagged / _SIMULATED_AUDITS


def _detectable_noise(view: _CanaryView, verdict, *, power: float, seed: int) -> float:
    """The largest noise multiplier at which the audit exceeds the claim w.p. >= ``power``.

    Bisection in log(sigma) between the claimed sigma and sigma / 20; every level is simulated
    with the same seed (common random numbers), so the estimate falls steadily with sigma.
    Returns 0.0 when even sigma / 20 is not caught that often.
    """

    def caught(noise):
        return _flag_probability(view, noise, verdict, seed=seed) >= power

    high = view.noise_multiplier
    low = high / _POWER_SEARCH_FLOOR
    if caught(high):
        return high
    if not caught(low):
        return 0.0
    for _ in range(_POWER_SEARCH_ITERATIONS):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if caught(mid) else (low, mid)
    return low


# ---------------------------------------------------------------------------------------------
# Canaries inside a real dpfused run
# ---------------------------------------------------------------------------------------------


class _ProbedModel(nn.Module):
    """The user's model and a canary probe side by side; canaries only ever touch the probe.

    The probe is an ``nn.Embedding(m, 1)``: example i looks up row ``canary_ids[i]`` and scales it
    by ``canary_scales[i]``, so its gradient on the probe is ``canary_scales[i] * e_{id}`` (zero
    for the user's examples and for excluded canaries, whose scale is 0). A lookup costs O(1) per
    example whatever m is, so an audit can plant tens of thousands of canaries.
    """

    def __init__(self, body: nn.Module, num_canaries: int):
        super().__init__()
        like = next(body.parameters(), torch.empty(0))  # the probe lives where the model does
        self.body = body
        self.probe = nn.Embedding(num_canaries, 1, dtype=like.dtype, device=like.device)
        nn.init.zeros_(self.probe.weight)

    def forward(self, inputs, canary_ids, canary_scales):
        weight = self.probe.weight
        probe_out = self.probe(canary_ids.to(weight.device))[:, 0] * canary_scales.to(weight)
        return self.body(inputs), probe_out


class _CanaryDataset(Dataset):
    """The user's examples, then one slot per canary: ``(example, canary id, scale, is_canary)``.

    A canary slot reuses a user example as the model's input (its loss there is masked out) and
    carries its id j with scale ``canary_norm`` when included, 0 when not; the user's examples
    carry id 0 with scale 0.
    """

    def __init__(self, dataset: Dataset, included: np.ndarray, canary_norm: float):
        self.dataset, self.included, self.canary_norm = dataset, included, canary_norm
        self.num_real = len(dataset)

    def __len__(self):
        return self.num_real + self.included.size

    def __getitem__(self, index):
        if index < self.num_real:
            return self.dataset[index], 0, 0.0, False
        j = index - self.num_real
        scale = self.canary_norm if self.included[j] else 0.0
        return self.dataset[j % self.num_real], j, scale, True


@dataclass(frozen=True)
class _RunConfig:
    make_model: Callable[[], nn.Module]
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    dataset: Dataset
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batch_size: int
    steps: int
    noise_multiplier: float
    max_grad_norm: float
    clipping: str
    sampling: str
    delta: float
    accountant: str
    canary_norm: float


@dataclass(frozen=True)
class _RunResult:
    """One audited run: a score per canary, the claim, and what the power model needs."""

    scores: np.ndarray
    claimed_epsilon: float | None
    view: _CanaryView
    ledger: tuple[SampledStep, ...]


def _run(config: _RunConfig, included: np.ndarray, seed: int, claim: bool = True) -> _RunResult:
    """One private training run with canaries.

    ``claim=False`` skips the accountant's epsilon (the costly part of a tiny run) for runs whose
    configuration, hence claim, is that of a run already accounted.
    """
    # The run draws from torch's global RNG (the model's init, the DataLoader's base seed): seed
    # it for repeatable audits, inside a fork so the caller's RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _seeded_run(config, included, seed, claim)


def _seeded_run(config, included, seed, claim):
    model = _ProbedModel(config.make_model(), included.size)
    optimizer = config.make_optimizer(model.parameters())
    loader = DataLoader(_CanaryDataset(config.dataset, included, config.canary_norm),
                        batch_size=config.batch_size)
    engine = PrivacyEngine(accountant=config.accountant)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=config.noise_multiplier, max_grad_norm=config.max_grad_norm,
        clipping=config.clipping, sampling=config.sampling, loss_reduction="mean",
        noise_generator=torch.Generator(model.probe.weight.device).manual_seed(seed + 1),
        sampling_generator=torch.Generator().manual_seed(seed + 2),
    )
    released, schedule = [], []
    device = model.probe.weight.device
    for batch in _logical_batches(loader, config.steps):
        (inputs, targets), ids, scales, is_canary = _to_device(batch, device)
        optimizer.zero_grad()
        if is_canary.numel() > 0:  # an empty Poisson batch steps without a backward (README)
            _canary_loss(model, config.loss_fn, inputs, targets, ids, scales,
                         is_canary).backward()
        optimizer.step()
        released.append(model.probe.weight.grad[:, 0].detach().to("cpu", torch.float64).clone())
        schedule.append(_slots_in_batch(ids[is_canary], included.size))
    observations = torch.stack(released).numpy() * loader.current.expected_size  # B_norm
    amplitude = _probe_threshold(optimizer, model.probe.weight) / config.max_grad_norm
    view = _canary_view(loader, steps=config.steps, amplitude=amplitude,
                        noise_multiplier=config.noise_multiplier,
                        num_real=len(config.dataset), canaries=included.size)
    scores = _observed_scores(observations / config.max_grad_norm, np.stack(schedule), view)
    return _RunResult(scores=scores,
                      claimed_epsilon=engine.get_epsilon(config.delta) if claim else None,
                      view=view, ledger=tuple(e.sampled for e in engine.accountant.entries))


def _logical_batches(loader, steps: int) -> Iterator:
    """``steps`` batches, over as many epochs as it takes (no max_physical_batch_size: one
    physical batch per logical step)."""
    taken = 0
    while True:
        for batch in loader:
            yield batch
            taken += 1
            if taken == steps:
                return


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _slots_in_batch(ids: torch.Tensor, canaries: int) -> np.ndarray:
    present = np.zeros(canaries, dtype=bool)
    present[ids.cpu().numpy()] = True
    return present


def _canary_loss(model, loss_fn, inputs, targets, ids, scales, is_canary):
    outputs, probe_out = model(inputs, ids, scales)
    losses = loss_fn(outputs, targets)
    if not isinstance(losses, torch.Tensor) or losses.shape != is_canary.shape:
        raise ValueError(
            f"loss_fn must return one loss per example (shape {tuple(is_canary.shape)}), got "
            f"{getattr(losses, 'shape', type(losses).__name__)}; use reduction='none'"
        )
    # Canary slots contribute only through the probe (torch.where passes them no gradient).
    per_example = torch.where(is_canary, torch.zeros_like(losses), losses)
    return (per_example + probe_out.to(losses.dtype)).mean()


def _probe_threshold(optimizer, probe_weight) -> float:
    """C_g of the probe's clipping group (C for flat; C / sqrt(K) for default per_layer)."""
    for group in optimizer.instrumentation.groups:
        if any(p is probe_weight for p in group.params):
            return float(group.threshold)
    raise RuntimeError("the canary probe is in no clipping group")


def _canary_view(loader, *, steps, amplitude, noise_multiplier, num_real, canaries) -> _CanaryView:
    """The canary's view of a run as the CLAIMED sampling draws it (never the sampler's output:
    a broken sampler must not make the power model describe the broken run)."""
    per_epoch = loader.batches_per_epoch
    if loader.sampling == "poisson":
        values = np.arange(steps + 1)
        probs = stats.binom.pmf(values, steps, loader.sample_rate)
        presence = float(loader.sample_rate)
    elif loader.sampling == "cyclic":  # the identity order: slot num_real + j is in one batch
        batch = (num_real + np.arange(canaries)) // loader.batch_size
        counts = np.where((batch < per_epoch) & (batch < steps),
                          (steps - 1 - batch) // per_epoch + 1, 0)
        values, frequency = np.unique(counts, return_counts=True)
        probs, presence = frequency / canaries, None
    else:  # shuffle: each epoch puts a slot in a batch w.p. (batches kept) * b / N
        in_epoch = per_epoch * loader.batch_size / loader.num_samples
        in_partial = (steps % per_epoch) * loader.batch_size / loader.num_samples
        full = steps // per_epoch
        probs = np.convolve(stats.binom.pmf(np.arange(full + 1), full, in_epoch),
                            [1.0 - in_partial, in_partial])
        values, presence = np.arange(full + 2), None
    return _CanaryView(steps=steps, amplitude=float(amplitude),
                       noise_multiplier=float(noise_multiplier), presence=presence,
                       count_values=values, count_probs=probs / probs.sum())


def _observed_scores(observations: np.ndarray, schedule: np.ndarray,
                     view: _CanaryView) -> np.ndarray:
    """Each canary's score from the released coordinates, (steps, canaries) in units of C.

    Poisson: the schedule is the secret the amplification rests on, so the score mixes over it.
    Cyclic and shuffle: the claim (one Gaussian per epoch, zero-out) holds for a public schedule,
    so the score may use it: the Gaussian log-likelihood ratio over the steps the slot was in.
    """
    if view.presence is not None:
        return _scores(observations, amplitude=view.amplitude, sigma=view.noise_multiplier,
                       presence=view.presence)
    return _scores_on_schedule(observations, schedule, amplitude=view.amplitude,
                               sigma=view.noise_multiplier)


def _scores(observations: np.ndarray, *, amplitude: float, sigma: float,
            presence: float) -> np.ndarray:
    """Log-likelihood ratio per canary: each step N(a, sigma^2) w.p. ``presence``, else N(0, ...).

    ``observations`` is (steps, canaries) in units of C.
    """
    shifted = (amplitude * observations - amplitude**2 / 2.0) / sigma**2
    if presence >= 1.0:
        return shifted.sum(axis=0)
    per_step = np.logaddexp(math.log1p(-presence), math.log(presence) + shifted)
    return per_step.sum(axis=0)


def _scores_on_schedule(observations: np.ndarray, schedule: np.ndarray, *, amplitude: float,
                        sigma: float) -> np.ndarray:
    """Log-likelihood ratio per canary, N(a, sigma^2) against N(0, sigma^2), over the steps its
    slot was in (``schedule``: (steps, canaries) booleans)."""
    shifted = (amplitude * observations - amplitude**2 / 2.0) / sigma**2
    return np.where(schedule, shifted, 0.0).sum(axis=0)


def _epsilon_with_noise(ledger: Sequence[SampledStep], noise_multiplier: float, *, delta: float,
                        accountant: str) -> float:
    """What the accountant claims for the audited run's steps released with another sigma."""
    claim = PrivacyAccountant(mechanism=accountant)
    for step in ledger:
        released = {**step.to_dict(), "noise_multiplier": noise_multiplier}
        claim.record(SampledStep.from_dict(released))
    return claim.get_epsilon(delta)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------

# A passing audit warns when it would more likely than not (at ``power``) also pass the same run
# released with the noise divided by this: the size of a real bug it must not miss (issue 28).
BLIND_NOISE_DIVISOR = 3.0


@dataclass(frozen=True)
class AuditReport:
    """What an audit found, and what it could have found.

    Attributes:
        epsilon_lower_bound: epsilon the implementation provably exceeds, at ``confidence``.
        claimed_epsilon: what dpfused's accountant claims for the same run (same delta).
        delta: the delta of both.
        confidence: probability with which the lower bound holds.
        method: "one_run" or "trials".
        canaries: canaries planted (over all runs).
        runs: training runs made.
        steps: logical steps per run.
        noise_multiplier: the claimed sigma.
        ceiling: the bound the audit returns if every guess is right (one_run) or the test is
            perfect (trials): no run, however leaky, can make it say more.
        detectable_epsilon: the smallest epsilon the audit detects: a run of this configuration
            released with ``detectable_noise_multiplier`` instead of sigma (what the accountant
            claims for that) is flagged with probability about ``power``; a smaller leak passes
            more often than not. ``math.inf``: not even sigma / 20 is flagged that often.
        detectable_noise_multiplier: that noise multiplier (0.0 with ``math.inf``).
        power: the detection probability ``detectable_epsilon`` is stated for.
        guesses, correct: one_run only: guesses made and how many were right (else 0).
    """

    epsilon_lower_bound: float
    claimed_epsilon: float
    delta: float
    confidence: float
    method: str
    canaries: int
    runs: int
    steps: int
    noise_multiplier: float
    ceiling: float
    detectable_epsilon: float
    detectable_noise_multiplier: float
    power: float
    guesses: int = 0
    correct: int = 0

    @property
    def exceeds_claim(self) -> bool:
        """True proves a privacy bug (at ``confidence``); False proves nothing."""
        return self.epsilon_lower_bound > self.claimed_epsilon

    @property
    def blind(self) -> bool:
        """The audit passed, but would likely (at ``power``) also have passed this run released
        with the noise divided by ``BLIND_NOISE_DIVISOR``: its "pass" says little."""
        return not self.exceeds_claim and (
            self.detectable_noise_multiplier < self.noise_multiplier / BLIND_NOISE_DIVISOR)

    def __str__(self) -> str:
        detail = (f", {self.correct}/{self.guesses} guesses right" if self.method == "one_run"
                  else "")
        lines = [
            f"privacy audit ({self.method}, {self.canaries} canaries, {self.runs} run(s) of "
            f"{self.steps} steps{detail}):",
            f"  epsilon >= {self.epsilon_lower_bound:.4g} with {self.confidence:.0%} confidence",
            f"  claimed epsilon = {self.claimed_epsilon:.4g} (delta = {self.delta:g}, noise "
            f"multiplier {self.noise_multiplier:.4g})",
            f"  ceiling: {self.ceiling:.4g} (the bound if every guess were right)",
            f"  power: {self._power_line()}",
            f"  {self._verdict()}",
        ]
        if self.blind:
            lines.append(f"  WARNING: {self.blind_warning()}")
        return "\n".join(lines)

    def _power_line(self) -> str:
        if math.isinf(self.detectable_epsilon):
            return (f"flags with probability >= {self.power:.0%} no run of this configuration, "
                    f"even one with noise multiplier {self.noise_multiplier:.4g} / "
                    f"{_POWER_SEARCH_FLOOR:g}")
        return (f"flags a run of this configuration with true epsilon >= "
                f"{self.detectable_epsilon:.4g} (noise multiplier <= "
                f"{self.detectable_noise_multiplier:.4g}) with probability >= {self.power:.0%}")

    def _verdict(self) -> str:
        if self.exceeds_claim:
            return "EXCEEDS the claim: the implementation leaks more than it claims (a bug)"
        if math.isinf(self.detectable_epsilon):
            unseen = "a run leaking any amount would likely have passed too"
        else:
            unseen = (f"a run leaking up to epsilon {self.detectable_epsilon:.4g} would have "
                      f"passed too with probability above {1 - self.power:.0%}")
        return (f"below the claim: consistent with it, but it could not have seen more: {unseen} "
                f"(this does not prove the claim)")

    def blind_warning(self) -> str:
        """Why this pass says little, and what to change to see more."""
        third = f"{self.noise_multiplier:.4g} / {BLIND_NOISE_DIVISOR:g}"
        if self.ceiling <= self.claimed_epsilon:
            why = (f"its ceiling {self.ceiling:.4g} is at or below the claim "
                   f"{self.claimed_epsilon:.4g}: no run, however leaky, can fail it")
        elif math.isinf(self.detectable_epsilon):
            why = (f"it would likely pass this run even with noise multiplier "
                   f"{self.noise_multiplier:.4g} / {_POWER_SEARCH_FLOOR:g}")
        else:
            ratio = self.detectable_epsilon / self.claimed_epsilon
            why = (f"it flags (probability {self.power:.0%}) only runs with noise multiplier <= "
                   f"{self.detectable_noise_multiplier:.4g} (true epsilon >= "
                   f"{self.detectable_epsilon:.4g}, {ratio:.3g}x the claim "
                   f"{self.claimed_epsilon:.4g}), so a bug dividing the noise by "
                   f"{BLIND_NOISE_DIVISOR:g} (noise multiplier {third}) would likely pass")
        more = ("more canaries (to about 0.03 / delta; beyond that the one-run theorem's delta "
                "term lowers the ceiling)" if self.method == "one_run" else "more runs (trials)")
        return (f"this audit is too weak for this claim: {why}. To see more: {more}; a larger "
                f"canary gradient (clipping='flat' gives the canary all of C, per_layer only its "
                f"group's share); every canary in every step (sampling='cyclic' with batch_size = "
                f"len(dataset) + canaries); fewer steps per canary (a shorter audit run: the claim "
                f"grows with the steps toward the ceiling). The README's 'Auditing privacy "
                f"empirically' lists settings measured to catch the noise divided by 3.")


def audit_privacy(
    *,
    make_model: Callable[[], nn.Module],
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    dataset: Dataset,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int,
    steps: int,
    noise_multiplier: float,
    max_grad_norm: float,
    delta: float,
    clipping: str = "flat",
    sampling: str = "poisson",
    method: str = "one_run",
    canaries: int = 1000,
    trials: int = 200,
    confidence: float = 0.95,
    power: float = 0.5,
    accountant: str = "pld",
    canary_norm: float | None = None,
    seed: int = 0,
) -> AuditReport:
    """Audit a training configuration: an epsilon lower bound from canaries, against the claim.

    Every run is a real dpfused run: ``PrivacyEngine(accountant=...).make_private`` on the model
    from ``make_model`` (with a canary probe beside it, see the module docstring), the optimizer
    from ``make_optimizer`` and a loader of ``batch_size`` over ``dataset`` plus the canary slots,
    then ``steps`` calls of ``optimizer.step()``.

    A lower bound BELOW the claimed epsilon proves nothing about correctness: audits are loose and
    a bug may not show on these canaries. A lower bound ABOVE the claim proves, at ``confidence``,
    that the run is less private than claimed: a bug. The report also says what the audit could
    have seen: its ceiling and the smallest epsilon it detects with probability ``power``; it
    warns (``UserWarning``) when it passes but would likely have passed the noise divided by 3.

    Args:
        make_model: builds the model (a fresh one per run; seeded by the audit).
        make_optimizer: builds a torch optimizer from an iterable of parameters.
        dataset: map-style dataset of ``(input, target)`` pairs (default-collated).
        loss_fn: ``loss_fn(model(inputs), targets)`` -> per-example losses, shape (B,)
            (e.g. ``nn.CrossEntropyLoss(reduction="none")``).
        batch_size: the loader's batch size (expected batch size under Poisson). The dataset
            seen by the sampler has ``len(dataset) + canaries`` examples (one per run for
            "trials"), so q = batch_size / that.
        steps: logical steps per run.
        noise_multiplier: sigma > 0.
        max_grad_norm: C.
        delta: the delta of both the claim and the bound.
        clipping: "flat", "per_layer" or "per_device". The probe is a clipping group of its own
            under per_layer, so canaries reach only its threshold C_g, not C: the audit is then
            valid but looser.
        sampling: "poisson", "cyclic" or "shuffle".
        method: "one_run" (one run, ``canaries`` canaries each included with probability 1/2) or
            "trials" (``trials`` runs with one canary, included in half of them).
        canaries: number of canaries for "one_run".
        trials: number of runs for "trials" (even, >= 8).
        confidence: probability with which the lower bound holds, in (0, 1).
        power: the detection probability the report's ``detectable_epsilon`` is stated for.
        accountant: the engine's accountant, "pld" or "rdp".
        canary_norm: a canary's gradient norm before clipping; default 1000 * C.
        seed: everything (models, sampling, noise, canary inclusion, the power model's
            simulation) is drawn from it.

    Returns:
        An ``AuditReport``; ``print(report)`` says what it means.

    Raises:
        ValueError / TypeError: a bad argument, named, before any training.

    Warns:
        UserWarning: the audit passed but would likely also pass this run with the noise divided
            by ``BLIND_NOISE_DIVISOR`` (``AuditReport.blind``).
    """
    _check_audit_arguments(
        method=method, canaries=canaries, trials=trials, confidence=confidence, power=power,
        delta=delta, steps=steps, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, batch_size=batch_size, dataset=dataset,
        callables=dict(make_model=make_model, make_optimizer=make_optimizer, loss_fn=loss_fn))
    config = _RunConfig(
        make_model=make_model, make_optimizer=make_optimizer, dataset=dataset, loss_fn=loss_fn,
        batch_size=batch_size, steps=steps, noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm), clipping=clipping, sampling=sampling, delta=delta,
        accountant=accountant,
        canary_norm=float(canary_norm) if canary_norm is not None else 1000.0 * max_grad_norm,
    )
    rng = np.random.default_rng(seed)
    if method == "one_run":
        found, result = _one_run_audit(config, canaries, delta, confidence, rng)
        verdict = _OneRunVerdict(canaries=canaries, claim=result.claimed_epsilon, delta=delta,
                                 confidence=confidence)
        ceiling = one_run_ceiling(canaries=canaries, delta=delta, confidence=confidence)
    else:
        found, result = _trials_audit(config, trials, delta, confidence, rng)
        verdict = _TrialsVerdict(trials=trials, claim=result.claimed_epsilon, delta=delta,
                                 confidence=confidence)
        ceiling = trials_ceiling(trials=trials, delta=delta, confidence=confidence)
    noise = _detectable_noise(result.view, verdict, power=power,
                              seed=int(rng.integers(2**31)))
    detectable = (_epsilon_with_noise(result.ledger, noise, delta=delta, accountant=accountant)
                  if noise > 0 else math.inf)
    report = AuditReport(
        claimed_epsilon=result.claimed_epsilon, delta=delta, confidence=confidence, method=method,
        steps=steps, noise_multiplier=config.noise_multiplier, ceiling=ceiling,
        detectable_epsilon=detectable, detectable_noise_multiplier=noise, power=power, **found)
    if report.blind:
        warnings.warn(f"dpfused.audit: {report.blind_warning()}", UserWarning, stacklevel=2)
    return report


def _one_run_audit(config, canaries, delta, confidence, rng):
    included = rng.random(canaries) < 0.5
    result = _run(config, included, seed=int(rng.integers(2**31)))
    eps, guesses, correct = epsilon_from_guesses(scores=result.scores, included=included,
                                                 delta=delta, confidence=confidence)
    return dict(epsilon_lower_bound=eps, canaries=canaries, runs=1, guesses=guesses,
                correct=correct), result


def _trials_audit(config, trials, delta, confidence, rng):
    included = rng.permutation(np.arange(trials) < trials // 2)
    # Every run has the same configuration (dataset size, q, steps, sigma), so one claim.
    results = [_run(config, np.array([inc]), seed=int(rng.integers(2**31)), claim=i == 0)
               for i, inc in enumerate(included)]
    scores = np.array([r.scores[0] for r in results])
    eps = epsilon_from_scores(scores_in=scores[included], scores_out=scores[~included],
                              delta=delta, confidence=confidence, seed=int(rng.integers(2**31)))
    return dict(epsilon_lower_bound=eps, canaries=trials // 2, runs=trials), results[0]


def _check_audit_arguments(*, method, canaries, trials, confidence, power, delta, steps,
                           noise_multiplier, max_grad_norm, batch_size, dataset, callables):
    check_choice("method", method, METHODS)
    for name, fn in callables.items():
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    for name, value, least in (("canaries", canaries, 2), ("trials", trials, 8),
                               ("steps", steps, 1), ("batch_size", batch_size, 1)):
        check_integer(name, value, at_least=least)
    if trials % 2:
        raise ValueError(f"trials must be even (half with the canary, half without), got {trials}")
    check_number("confidence", confidence, "in (0, 1)", lambda v: 0 < v < 1)
    check_number("power", power, "in (0, 1)", lambda v: 0 < v < 1)
    check_delta(delta)
    check_max_grad_norm(max_grad_norm, hint=" (one number: the total clipping norm C)")
    check_number("noise_multiplier", noise_multiplier, "> 0 to audit (sigma = 0 claims no privacy)",
                 lambda v: v > 0)
    check_map_style_dataset(dataset, name="dataset")
