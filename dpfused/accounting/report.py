"""The privacy report: what was spent, and under which assumptions, in words (§7)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpfused.accounting.last_iterate import gaussian_rdp_epsilon, last_iterate_assumptions
from dpfused.accounting.ledger import PrivacyAccountant
from dpfused.accounting.records import UNSAMPLED, LastIterateUnavailable
from dpfused.arguments import check_delta, check_flag, check_number

__all__ = ["PrivacyReport", "privacy_report"]


@dataclass(frozen=True)
class PrivacyReport:
    """What was spent, and under which assumptions.

    ``sample_rate`` is the largest rate of the Poisson steps (q b for cyclic Poisson with b
    partitions), ``batch_size`` the (largest) fixed batch size of the cyclic/shuffled ones,
    ``noise_multiplier`` the smallest sigma accounted (of the steps with a guarantee; divided by
    the BandMF strategy's largest column norm), ``noise`` the mechanism in words, ``partitions``
    b of cyclic Poisson sampling and ``max_batch_size`` K of truncated Poisson sampling.
    ``no_guarantee``: why every epsilon is infinite and from which step (a step on batches the
    private data loader did not draw), or None.
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
    no_guarantee: str | None = None
    noise: str = "independent Gaussian noise (DP-SGD)"
    partitions: int | None = None
    max_batch_size: int | None = None

    def __str__(self) -> str:
        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.4g}"

        if self.sampling == "poisson":
            sampling = f"poisson, sample rate {fmt(self.sample_rate)}"
            if self.max_batch_size is not None:
                sampling += f", truncated to {self.max_batch_size} examples"
        elif self.sampling == "cyclic_poisson":
            sampling = (f"cyclic Poisson (b-min-sep), {self.partitions} partitions, rate "
                        f"{fmt(self.sample_rate)} within a partition")
        elif self.sampling in ("cyclic", "shuffle"):
            sampling = f"{self.sampling}, batch size {self.batch_size}"
        elif self.sampling == UNSAMPLED:
            sampling = "none: no step ran on a batch the private data loader drew"
        else:
            sampling = self.sampling or "none (no steps)"
        if self.last_iterate_epsilon is not None:
            last = f"{fmt(self.last_iterate_epsilon)}  (only the final model released)"
        else:
            last = f"n/a  ({self.last_iterate_reason})"
        rows = [("PRIVACY GUARANTEE", f"NONE: {self.no_guarantee}")] if self.no_guarantee else []
        rows += [
            ("accountant", self.accountant),
            ("neighbouring datasets", self.neighboring),
            ("mechanism", self.noise),
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
    delta = check_delta(delta)
    _check_last_iterate_options(smoothness, convex)
    no_guarantee = _no_guarantee(accountant)
    steps = [e.sampled for e in accountant.entries if e.sampled.guaranteed]
    samplings = sorted({s.sampling for s in steps})
    assumptions = _composed_assumptions(accountant, steps, samplings)
    if no_guarantee is not None:
        assumptions.insert(0, f"NO PRIVACY GUARANTEE: {no_guarantee}")
    last_eps, reason, worst = _last_iterate(accountant, delta, smoothness, convex, assumptions)
    composed = accountant.get_epsilon(delta)
    if last_eps is not None and composed < last_eps:
        # The final model is one of the released iterates, so the composed bound covers it too
        # (post-processing); report the smaller one and say which bound is binding.
        assumptions.append(
            f"the shifted-Renyi bound ({last_eps:.4g}) is above the composed bound here; the "
            "composed bound also covers the final model and is reported"
        )
        last_eps = composed
    rates = [s.sample_rate for s in steps if s.sample_rate is not None]
    sizes = [s.batch_size for s in steps if s.batch_size is not None]
    sigmas = [s.noise_multiplier for s in steps]
    bands = max((s.bands for s in steps), default=1)
    limits = [s.max_batch_size for s in steps if s.truncated]
    return PrivacyReport(
        composed_epsilon=composed,
        last_iterate_epsilon=last_eps,
        last_iterate_reason=reason,
        delta=delta,
        steps=accountant.steps,
        epochs=accountant.epochs_started,
        sampling=samplings[0] if len(samplings) == 1 else (
            "mixed" if samplings else (UNSAMPLED if no_guarantee else None)),
        sample_rate=max(rates) if rates else None,
        batch_size=max(sizes) if sizes else None,
        noise_multiplier=min(sigmas) if sigmas else None,
        neighboring=accountant.neighboring,
        accountant=accountant.mechanism,
        assumptions=tuple(assumptions),
        last_iterate_worst_position=worst,
        no_guarantee=no_guarantee,
        noise=_noise_in_words(steps),
        partitions=bands if "cyclic_poisson" in samplings else None,
        max_batch_size=max(limits) if limits else None,
    )


def _noise_in_words(steps) -> str:
    """The mechanism: DP-SGD's independent noise, or BandMF's correlated noise."""
    banded = sorted({(s.bands, s.strategy) for s in steps if s.bands > 1})
    if not banded:
        return "independent Gaussian noise (DP-SGD)"
    names = {"sqrt": "square-root", "optimized": "optimized"}
    return "; ".join(f"BandMF, {b} bands, {names.get(strategy, strategy)} Toeplitz strategy "
                     "(correlated noise)" for b, strategy in banded)


def _no_guarantee(accountant: PrivacyAccountant) -> str | None:
    """Why every epsilon is infinite, from which step, or None (see ``SampledStep.unsampled``)."""
    first = accountant.first_unguaranteed_step
    if first is None:
        return None
    count = sum(not e.sampled.guaranteed for e in accountant.entries)
    return (f"from step {first} on (counting from 0) every epsilon is infinite: {count} of "
            f"{accountant.steps} steps ran on batches the private data loader did not draw "
            "(optimizer.step() after a backward on other data, e.g. random tensors in a "
            "benchmark), and nothing bounds what such a step reveals of the training data")


def _check_last_iterate_options(smoothness, convex) -> None:
    """A wrong type or a NaN/inf is the caller's mistake and raises; L <= 0 is a number the bound
    does not cover, reported as ``last_iterate_reason`` like the bound's other refusals."""
    if smoothness is not None:
        check_number("smoothness", smoothness, "a finite number > 0 (or None)", math.isfinite)
    check_flag("convex", convex)


_ADJACENCY_IN_WORDS = {
    "add_remove": "neighbouring datasets differ by adding or removing one example",
    "zero_out": "neighbouring datasets differ by zeroing out one example: it is replaced by a "
                "null example with zero gradient and every other example keeps its batch and step "
                "(zero-out adjacency, Kairouz et al. 2021)",
    "replace_one": "neighbouring datasets differ by replacing one example (sensitivity 2C)",
}


def _composed_assumptions(accountant, steps, samplings) -> list[str]:
    if accountant.neighboring in _ADJACENCY_IN_WORDS:
        adjacency = [_ADJACENCY_IN_WORDS[accountant.neighboring]]
    else:  # per sampling
        adjacency = [f"{_ADJACENCY_IN_WORDS[n]} ({which} steps)"
                     for n, which in (("add_remove", "Poisson"), ("zero_out", "cyclic/shuffled"))]
    assumptions = [
        "every iterate may be released (composed epsilon)",
        *adjacency,
        "each example's gradient is clipped to the total norm C and the noise std is sigma*C",
        "the sampling rate q, the batch size and the dataset size N the sampler used are public "
        "and fixed before training (q = batch size / N treats the dataset size as public)",
    ]
    if any(s.adaptive_clipping for s in steps):
        assumptions.append(
            "adaptive clipping: each step also released noisy per-group counts of unclipped "
            "examples; the noise multiplier shown is sigma_eff of gradient and counts together"
        )
    if "poisson" in samplings:
        assumptions.append("Poisson sampling: every example joins each batch independently with rate q")
    if any(s.truncated for s in steps):
        assumptions.append(
            "truncated Poisson sampling: a draw of more than K examples is cut to a uniformly "
            "random subset of K; accounted as dp_accounting's TruncatedSubsampledGaussianDpEvent, "
            "the larger epsilon of dataset sizes N and N + 1 (the run's N is public)")
    if "cyclic_poisson" in samplings:
        assumptions.append(
            "cyclic Poisson (b-min-sep) sampling: every example is put in one of b partitions at "
            "random before training, and step t draws Poisson from partition t mod b at rate q b, "
            "so an example joins at most one step in any b consecutive ones; each cycle of b "
            "steps is one Poisson-sampled Gaussian (ceil(T/b) of them; amplified BandMF, "
            "Choquette-Choo et al. 2023, Thm. 4)")
    if any(s.bands > 1 for s in steps):
        assumptions.append(
            "BandMF: step t releases the clipped sum plus sigma C (M^-1 Z)_t, M a b-banded "
            "lower-triangular Toeplitz strategy; an example's steps are at least b apart, so it "
            "moves disjoint columns of M, and sigma is divided by M's largest column norm")
    if {"cyclic", "shuffle"} & set(samplings):
        assumptions.append(
            "cyclic/shuffled batches: each example is used once per epoch; one Gaussian per epoch, "
            "no amplification by sampling claimed"
        )
    return assumptions


def _last_iterate(accountant, delta, smoothness, convex, assumptions):
    """(epsilon, reason it is missing, worst position); adds its assumptions when it applies."""
    try:
        bound = accountant.last_iterate_bound(smoothness=smoothness, convex=convex)
    except LastIterateUnavailable as exc:
        return None, exc.reason, None
    assumptions += last_iterate_assumptions(
        accountant.entries, smoothness=smoothness, convex=convex, worst=bound.worst_position,
        neighboring=accountant.last_iterate_neighboring,
    )
    return gaussian_rdp_epsilon(bound.rho, delta), None, bound.worst_position
