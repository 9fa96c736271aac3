"""The two values one DP-SGD step is made of, flowing one way (docs/design.md §2).

    sampler ──LogicalBatch──▶ book-keeper ──ClippedStep──▶ DPOptimizer.step ──DpEvent──▶ accountant

- The data loader emits a :class:`LogicalBatch` with every physical batch it yields: the sampling
  facts of the logical batch the physical batch belongs to (they are what the accountant needs)
  and where the physical batch sits in it.
- The book-keeper (``dpfused.clipping``) collects the backward passes of one logical batch and
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

__all__ = ["SAMPLINGS", "LogicalBatch", "ClippedStep"]

# The sampling schemes, named once (docs/design.md §6).
SAMPLINGS = ("poisson", "cyclic", "shuffle")


def expected_batch_size(*, sampling: str, sample_rate: float | None, num_samples: int,
                        batch_size: int | None) -> float:
    """The expected logical batch size: q * N under Poisson sampling, b under cyclic/shuffle.
    Public (fixed before training), never the realized size of a Poisson batch."""
    if sampling == "poisson":
        return sample_rate * num_samples
    return float(batch_size)


@dataclass(frozen=True, kw_only=True)
class LogicalBatch:
    """One logical batch as the sampler drew it, seen from one of its physical batches.

    Attributes:
        sampling: "poisson", "cyclic" or "shuffle".
        sample_rate: q, for Poisson sampling (None otherwise).
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

    @property
    def expected_size(self) -> float:
        """q * N under Poisson sampling, b under cyclic/shuffle: B_norm of a mean loss (§5)."""
        return expected_batch_size(sampling=self.sampling, sample_rate=self.sample_rate,
                                   num_samples=self.num_samples, batch_size=self.batch_size)

    def dp_event(self, noise_multiplier: float) -> dp_accounting.DpEvent:
        """The mechanism this logical batch releases with noise multiplier sigma (§7).

        Poisson: ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``. Cyclic/shuffle: each example
        is in exactly one batch of the epoch, so the step is a ``GaussianDpEvent(sigma)`` on the
        examples of this batch; the accountant composes the steps of one epoch as ONE Gaussian.
        """
        gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
        if self.sampling == "poisson":
            return dp_accounting.PoissonSampledDpEvent(self.sample_rate, gaussian)
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
