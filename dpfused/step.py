"""The two values one DP-SGD step is made of, flowing one way (docs/design.md §2).

    sampler ──LogicalBatch──▶ book-keeper ──ClippedStep──▶ DPOptimizer.step ──DpEvent──▶ accountant

- The data loader emits a :class:`LogicalBatch` with every physical batch it yields: the sampling
  facts of the logical batch the physical batch belongs to (they are what the accountant needs)
  and where the physical batch sits in it.
- The book-keeper (``dpfused.bookkeeper``) collects the backward passes of one logical batch and
  closes them into a :class:`ClippedStep`: per-parameter clipped sums, per-group counts, the
  thresholds they were clipped with, and the logical batch itself.
- ``DPOptimizer.step`` reads only that value: it releases it (noise, via ``privacy_math``), steps the
  wrapped optimizer and hands the step's ``DpEvent`` to the accountant.

Both values are frozen: no module writes into another's state to pass a fact along.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dp_accounting
import torch

from dpfused import privacy_math

__all__ = ["SAMPLINGS", "POISSON_SAMPLINGS", "LogicalBatch", "ClippedStep"]

# The sampling schemes, named once (docs/design.md §6).
SAMPLINGS = ("poisson", "cyclic", "shuffle", "cyclic_poisson")
# Those that draw a Poisson batch (a variable size, a rate q, amplification by sampling).
POISSON_SAMPLINGS = ("poisson", "cyclic_poisson")


def partition_sample_rate(sample_rate: float, partitions: int) -> float:
    """q b: the rate at which a cyclic Poisson step draws from its partition of about N / b
    examples, so that the expected batch stays q N. The sampler and the accountant use this one
    number."""
    return float(sample_rate) * int(partitions)


def expected_batch_size(*, sampling: str, sample_rate: float | None, num_samples: int,
                        batch_size: int | None, max_batch_size: int | None = None) -> float:
    """The expected logical batch size: q * N under Poisson sampling (cyclic Poisson too: q b
    times about N / b), E[min(Binomial(N, q), K)] when truncated to K, b under cyclic/shuffle.
    Public (fixed before training), never the realized size of a Poisson batch."""
    if sampling == "poisson" and max_batch_size is not None:
        return privacy_math.truncated_expected_batch_size(
            num_samples=num_samples, sample_rate=sample_rate, max_batch_size=max_batch_size)
    if sampling in POISSON_SAMPLINGS:
        return sample_rate * num_samples
    return float(batch_size)


@dataclass(frozen=True, kw_only=True)
class LogicalBatch:
    """One logical batch as the sampler drew it, seen from one of its physical batches.

    Attributes:
        sampling: "poisson", "cyclic", "shuffle" or "cyclic_poisson".
        sample_rate: q, for Poisson and cyclic Poisson sampling (None otherwise); a cyclic
            Poisson step draws from its partition at q * partitions.
        batch_size: the fixed logical batch size b, for cyclic/shuffle (None for Poisson).
        num_samples: N, the dataset size the sampler draws from (public, fixed before training).
        step: logical step index since the start (global, survives epochs and resumption).
        epoch: epoch index (0-based).
        position_in_epoch: logical batch index within the epoch (0-based).
        batches_per_epoch: logical batches per epoch.
        logical_size: examples in this logical batch (all ranks).
        local_size: examples of this logical batch on this rank (= logical_size on one process).
        physical_size: examples in this physical batch.
        is_last_physical: True on the physical batch that completes its logical batch.
        padding: examples at the end of this physical batch that are not part of the logical
            batch (FSDP2, whose collectives need every rank to run each physical batch: a rank
            with no example of its own for one runs one example of the logical batch with weight
            exactly 0 instead, so that models that cannot forward an empty batch still work).
            Counted in ``physical_size``, not in ``local_size``.
        partitions: cyclic Poisson sampling: b, the number of partitions (None otherwise).
        max_batch_size: truncated Poisson sampling: K (None: no truncation).
        truncated: the sampler cut this logical batch to K (a fact of the sampler's coins, no
            more private than the batch size; for the trainer's eyes, not for release).
    """

    sampling: str
    sample_rate: float | None = None
    batch_size: int | None = None
    num_samples: int
    step: int
    epoch: int
    position_in_epoch: int
    batches_per_epoch: int
    logical_size: int
    local_size: int
    physical_size: int
    is_last_physical: bool
    padding: int = 0
    partitions: int | None = None
    max_batch_size: int | None = None
    truncated: bool = False

    @property
    def expected_size(self) -> float:
        """q * N under Poisson sampling (E[min(Binomial(N, q), K)] truncated to K), b under
        cyclic/shuffle: B_norm of a mean loss (§5)."""
        return expected_batch_size(sampling=self.sampling, sample_rate=self.sample_rate,
                                   num_samples=self.num_samples, batch_size=self.batch_size,
                                   max_batch_size=self.max_batch_size)

    @property
    def cycle(self) -> int | None:
        """Cyclic Poisson: the index of the cycle of b steps this step belongs to (an example
        joins at most one step of a cycle); None for other samplings. Epochs are whole cycles."""
        if self.sampling != "cyclic_poisson":
            return None
        return (self.epoch * self.batches_per_epoch + self.position_in_epoch) // self.partitions

    def dp_event(self, noise_multiplier: float) -> dp_accounting.DpEvent:
        """The mechanism this logical batch releases with noise multiplier sigma (§7).

        Poisson: ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``; truncated to K:
        ``TruncatedSubsampledGaussianDpEvent(N, q, K, sigma)``. Cyclic Poisson:
        ``PoissonSampledDpEvent(q b, GaussianDpEvent(sigma))``, the rate of its partition (the
        accountant composes one per cycle of b steps). Cyclic/shuffle: each example is in exactly
        one batch of the epoch, so the step is a ``GaussianDpEvent(sigma)`` on the examples of
        this batch; the accountant composes the steps of one epoch as ONE Gaussian.
        """
        gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
        if self.sampling == "poisson" and self.max_batch_size is not None:
            return dp_accounting.TruncatedSubsampledGaussianDpEvent(
                dataset_size=self.num_samples, sampling_probability=self.sample_rate,
                truncated_batch_size=self.max_batch_size, noise_multiplier=noise_multiplier)
        if self.sampling == "poisson":
            return dp_accounting.PoissonSampledDpEvent(self.sample_rate, gaussian)
        if self.sampling == "cyclic_poisson":
            return dp_accounting.PoissonSampledDpEvent(
                partition_sample_rate(self.sample_rate, self.partitions), gaussian)
        return gaussian


@dataclass(frozen=True, kw_only=True)
class ClippedStep:
    """The clipped sums of one logical batch, closed by the book-keeper, read by the optimizer.

    Attributes:
        batch: the logical batch; None only when no DP data loader drew it (``instrument`` used
            directly, as the oracle tests do).
        sums: sum_i c_ig G_ig per parameter, keyed by ``id(param)``; a parameter no example
            touched has no entry (its sum is zero).
        thresholds: C_g of every clipping group, as used to clip these sums.
        loss_reduction: "mean" or "sum", the loss the sums were computed from.
        unclipped: adaptive thresholds only: per group index, sum_i (1[||G_ig|| <= C_g] - 1/2),
            un-noised. Private: only ``privacy_math.noised_counts`` may read it.
        examples: examples that went through a backward pass (on this process).
        backward_passes: backward passes that contributed.
        dropped: examples whose contribution was dropped for a NaN/inf gradient
            (``nonfinite_gradients="drop"``); they are included in ``examples``.
    """

    batch: LogicalBatch | None
    sums: dict[int, torch.Tensor] = field(default_factory=dict)
    thresholds: tuple[float, ...] = ()
    loss_reduction: str = "mean"
    unclipped: dict[int, torch.Tensor] = field(default_factory=dict)
    examples: int = 0
    backward_passes: int = 0
    dropped: int = 0
