"""Empirical privacy auditing: a lower bound on epsilon, measured on dpfused's real training steps.

The auditor plants white-box gradient canaries (Dirac canaries, Nasr et al. 2023; Steinke, Nasr &
Jagielski 2023) and reads the released (noised) gradient along their directions:

* The model is wrapped with a probe: ``nn.Linear(m, 1, bias=False)`` beside the user's model. Canary
  j is an extra example of the dataset whose loss is the probe's output on the input
  ``canary_norm * e_j`` and nothing else, so its per-example gradient is ``canary_norm * e_j`` on the
  probe (>> C: clipping leaves exactly C_probe * e_j) and zero on the user's model. An *excluded*
  canary keeps its slot in the dataset with a zero probe input: a null example with zero gradient
  (zero-out adjacency for cyclic/shuffle, and the same released sums as removing it under Poisson,
  since the normalizer is the expected batch size). Canaries therefore change nothing but the probe
  coordinates, and the sampler sees the same dataset whether they are in or out.
* Training runs through ``PrivacyEngine.make_private`` and ``optimizer.step()`` unchanged; after each
  step the auditor reads ``probe.weight.grad`` (the noised gradient the wrapped optimizer was given).
  Each canary's score is the log-likelihood ratio of its coordinate's observations under "present in
  each step with probability p" (p = q for Poisson, 1/batches per epoch otherwise) against "absent",
  computed with the *claimed* sigma. Any score gives a valid bound; this one makes it tight-ish.

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

Reading the result: an audited lower bound *below* the claimed epsilon proves nothing about
correctness (audits are loose, and a bug can hide from a given canary). A lower bound *above* the
claim proves, at the stated confidence, that the implementation leaks more than it claims: a bug.

Statistics come from scipy (binomial and beta distributions); this module needs ``scipy``
(``pip install dpfused[audit]``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from scipy import stats
from torch.utils.data import DataLoader, Dataset, IterableDataset

from dpfused.engine import PrivacyEngine

__all__ = [
    "AuditReport",
    "audit_privacy",
    "clopper_pearson",
    "epsilon_from_counts",
    "epsilon_from_scores",
    "epsilon_one_run",
    "epsilon_from_guesses",
    "one_run_p_value",
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
    level = 1.0 - (1.0 - confidence) / 2.0
    tpr_lo = clopper_pearson(true_positives, positives, confidence=level, side="lower")
    fpr_hi = clopper_pearson(false_positives, negatives, confidence=level, side="upper")
    excess = np.asarray(tpr_lo) - delta
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.where(excess > 0, np.log(np.maximum(excess, 1e-300) / fpr_hi), 0.0)
    eps = np.maximum(eps, 0.0)
    return float(eps) if eps.ndim == 0 else eps


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
    eps = epsilon_from_counts(true_positives=positive[0], positives=positive[1],
                              false_positives=negative[0], negatives=negative[1],
                              delta=delta, confidence=confidence)
    return eps.reshape(tau.shape) if isinstance(eps, np.ndarray) else eps


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
        guess_counts = sorted({max(1, round(m * f)) for f in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)})
    order = np.argsort(-scores, kind="stable")  # most confident "in" first
    level = 1.0 - (1.0 - confidence) / (2 * len(guess_counts))
    best = (0.0, 0, 0)
    for k in guess_counts:
        for top, bottom in ((k, 0), (k - k // 2, k // 2)):
            correct = int(included[order[:top]].sum() + (~included[order[m - bottom:]]).sum())
            eps = epsilon_one_run(canaries=m, guesses=top + bottom, correct=correct, delta=delta,
                                  confidence=level)
            if eps > best[0]:
                best = (eps, top + bottom, correct)
    return best


# ---------------------------------------------------------------------------------------------
# Canaries inside a real dpfused run
# ---------------------------------------------------------------------------------------------


class _ProbedModel(nn.Module):
    """The user's model and a canary probe side by side; canaries only ever touch the probe."""

    def __init__(self, body: nn.Module, num_canaries: int):
        super().__init__()
        like = next(body.parameters(), torch.empty(0))  # the probe lives where the model does
        self.body = body
        self.probe = nn.Linear(num_canaries, 1, bias=False, dtype=like.dtype, device=like.device)
        nn.init.zeros_(self.probe.weight)

    def forward(self, inputs, probe_inputs):
        return self.body(inputs), self.probe(probe_inputs.to(self.probe.weight))[:, 0]


class _CanaryDataset(Dataset):
    """The user's examples, then one slot per canary: ``(example, probe input, is_canary)``.

    A canary slot reuses a user example as the model's input (its loss there is masked out) and
    carries ``canary_norm * e_j`` as probe input when included, zeros when not.
    """

    def __init__(self, dataset: Dataset, included: np.ndarray, canary_norm: float):
        self.dataset, self.included, self.canary_norm = dataset, included, canary_norm
        self.num_real = len(dataset)

    def __len__(self):
        return self.num_real + self.included.size

    def __getitem__(self, index):
        probe = torch.zeros(self.included.size)
        if index < self.num_real:
            return self.dataset[index], probe, False
        j = index - self.num_real
        if self.included[j]:
            probe[j] = self.canary_norm
        return self.dataset[j % self.num_real], probe, True


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


def _run(config: _RunConfig, included: np.ndarray, seed: int,
         claim: bool = True) -> tuple[np.ndarray, float | None]:
    """One private training run with canaries: (score per canary, claimed epsilon or None).

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
    released = []
    device = model.probe.weight.device
    for batch in _logical_batches(loader, config.steps):
        (inputs, targets), probe_inputs, is_canary = _to_device(batch, device)
        optimizer.zero_grad()
        if is_canary.numel() > 0:  # an empty Poisson batch steps without a backward (README)
            _canary_loss(model, config.loss_fn, inputs, targets, probe_inputs, is_canary).backward()
        optimizer.step()
        released.append(model.probe.weight.grad[0].detach().to("cpu", torch.float64).clone())
    observations = torch.stack(released).numpy() * loader.current.expected_size  # B_norm
    scores = _scores(observations / config.max_grad_norm, amplitude=_probe_threshold(
        optimizer, model.probe.weight) / config.max_grad_norm,
        sigma=config.noise_multiplier, presence=_presence_probability(loader))
    return scores, engine.get_epsilon(config.delta) if claim else None


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


def _canary_loss(model, loss_fn, inputs, targets, probe_inputs, is_canary):
    outputs, probe_out = model(inputs, probe_inputs)
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


def _presence_probability(loader) -> float:
    if loader.sampling == "poisson":
        return float(loader.sample_rate)
    return 1.0 / loader.batches_per_epoch


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


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditReport:
    """What an audit found.

    Attributes:
        epsilon_lower_bound: epsilon the implementation provably exceeds, at ``confidence``.
        claimed_epsilon: what dpfused's accountant claims for the same run (same delta).
        delta: the delta of both.
        confidence: probability with which the lower bound holds.
        method: "one_run" or "trials".
        canaries: canaries planted (over all runs).
        runs: training runs made.
        steps: logical steps per run.
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
    guesses: int = 0
    correct: int = 0

    @property
    def exceeds_claim(self) -> bool:
        """True proves a privacy bug (at ``confidence``); False proves nothing."""
        return self.epsilon_lower_bound > self.claimed_epsilon

    def __str__(self) -> str:
        verdict = ("EXCEEDS the claim: the implementation leaks more than it claims (a bug)"
                   if self.exceeds_claim else
                   "below the claim (consistent with it; this does not prove the claim)")
        detail = (f", {self.correct}/{self.guesses} guesses right" if self.method == "one_run"
                  else "")
        return (f"privacy audit ({self.method}, {self.canaries} canaries, {self.runs} run(s) of "
                f"{self.steps} steps{detail}):\n"
                f"  epsilon >= {self.epsilon_lower_bound:.4g} with {self.confidence:.0%} confidence"
                f"\n  claimed epsilon = {self.claimed_epsilon:.4g} (delta = {self.delta:g})\n"
                f"  {verdict}")


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
    that the run is less private than claimed: a bug.

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
        accountant: the engine's accountant, "pld" or "rdp".
        canary_norm: a canary's gradient norm before clipping; default 1000 * C.
        seed: everything (models, sampling, noise, canary inclusion) is drawn from it.

    Returns:
        An ``AuditReport``; ``print(report)`` says what it means.

    Raises:
        ValueError / TypeError: a bad argument, named, before any training.
    """
    _check_audit_arguments(
        method=method, canaries=canaries, trials=trials, confidence=confidence, delta=delta,
        steps=steps, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        batch_size=batch_size, dataset=dataset,
        callables=dict(make_model=make_model, make_optimizer=make_optimizer, loss_fn=loss_fn))
    config = _RunConfig(
        make_model=make_model, make_optimizer=make_optimizer, dataset=dataset, loss_fn=loss_fn,
        batch_size=batch_size, steps=steps, noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm), clipping=clipping, sampling=sampling, delta=delta,
        accountant=accountant,
        canary_norm=float(canary_norm) if canary_norm is not None else 1000.0 * max_grad_norm,
    )
    rng = np.random.default_rng(seed)
    common = dict(delta=delta, confidence=confidence, method=method, steps=steps)
    if method == "one_run":
        included = rng.random(canaries) < 0.5
        scores, claimed = _run(config, included, seed=int(rng.integers(2**31)))
        eps, guesses, correct = epsilon_from_guesses(scores=scores, included=included,
                                                     delta=delta, confidence=confidence)
        return AuditReport(epsilon_lower_bound=eps, claimed_epsilon=claimed, canaries=canaries,
                           runs=1, guesses=guesses, correct=correct, **common)
    included = rng.permutation(np.arange(trials) < trials // 2)
    # Every run has the same configuration (dataset size, q, steps, sigma), so one claim.
    results = [_run(config, np.array([inc]), seed=int(rng.integers(2**31)), claim=i == 0)
               for i, inc in enumerate(included)]
    scores = np.array([s[0] for s, _ in results])
    claimed = results[0][1]
    eps = epsilon_from_scores(scores_in=scores[included], scores_out=scores[~included],
                              delta=delta, confidence=confidence, seed=int(rng.integers(2**31)))
    return AuditReport(epsilon_lower_bound=eps, claimed_epsilon=claimed, canaries=trials // 2,
                       runs=trials, **common)


def _check_audit_arguments(*, method, canaries, trials, confidence, delta, steps,
                           noise_multiplier, max_grad_norm, batch_size, dataset, callables):
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; use 'one_run' or 'trials'")
    for name, fn in callables.items():
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    for name, value, least in (("canaries", canaries, 2), ("trials", trials, 8),
                               ("steps", steps, 1)):  # batch_size is checked below
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if trials % 2:
        raise ValueError(f"trials must be even (half with the canary, half without), got {trials}")
    for name, value in (("confidence", confidence), ("delta", delta)):
        if not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
            or not math.isfinite(max_grad_norm) or max_grad_norm <= 0):
        raise ValueError(f"max_grad_norm must be one finite number > 0 (the total clipping norm "
                         f"C), got {max_grad_norm!r}")
    if not isinstance(noise_multiplier, (int, float)) or not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0 to audit (sigma = 0 claims no privacy), "
                         f"got {noise_multiplier!r}")
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__") or len(dataset) < 1:
        raise ValueError("dataset must be a non-empty map-style Dataset of (input, target) pairs")
