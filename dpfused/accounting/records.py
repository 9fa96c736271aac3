"""What the accountant's ledger holds, one entry per logical step (docs/design.md §7).

- :class:`SampledStep`: the step as a dp_accounting ``DpEvent`` produced from the sampler's
  ``LogicalBatch`` (``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` for Poisson,
  ``TruncatedSubsampledGaussianDpEvent(N, q, K, sigma)`` for Poisson truncated to K,
  ``PoissonSampledDpEvent(q b, GaussianDpEvent(sigma))`` for cyclic Poisson with b partitions, whose
  steps of one cycle of b compose as one, ``GaussianDpEvent(sigma)`` for cyclic/shuffle, whose
  steps of one epoch compose as one Gaussian), with the phase, epoch and cycle it belongs to and
  the noise (BandMF bands) it was released with. This is all the composed epsilon needs.
- :class:`IterateFacts`: what the last-iterate bound needs besides: the step's place in the fixed
  order, learning rate, every parameter group's weight decay, the loss reduction and the normalizer
  B_norm the noised sum was divided by, the clipping norm C of the step, and whether the optimizer
  was plain SGD.

Steps with no guarantee. A step on batches no private data loader drew (Opacus' benchmarks time
steps on ``torch.randn`` batches) is recorded as ``SampledStep.unsampled``: sampling
``"unsampled"``, dp_accounting's ``NonPrivateDpEvent``. Nothing bounds what it reveals of the data
(the batch may be anything, e.g. a training example chosen by the caller), so every epsilon from
that step on is infinite; the report says why and from which step.

Phases. A phase is one sampling run: the steps drawn by one private data loader. A second
``make_private`` on an engine whose ledger is not empty starts a new phase, whose loader counts its
epochs from 0 again; the epochs of different phases are different epochs (docs/design.md §7.2).

Adjacency names are defined here, once: ``add_remove`` (Poisson sampling), ``zero_out`` (cyclic and
shuffled batches: the example is replaced by a null example with zero gradient and every other
example keeps its slot, Kairouz et al. 2021) and ``replace_one`` (sensitivity 2C).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import dp_accounting

from dpfused.arguments import check_choice
from dpfused.step import POISSON_SAMPLINGS, SAMPLINGS, LogicalBatch

__all__ = [
    "LOSS_REDUCTIONS",
    "MECHANISMS",
    "UNSAMPLED",
    "NEIGHBORINGS",
    "IterateFacts",
    "LastIterateUnavailable",
    "LedgerEntry",
    "PrivacyBudgetExhausted",
    "SampledStep",
    "check_neighboring",
    "default_neighboring",
]

MECHANISMS = ("pld", "rdp")
NEIGHBORINGS = ("add_remove", "zero_out", "replace_one")
LOSS_REDUCTIONS = ("mean", "sum")
# The sampling name of a step on batches no private data loader drew: no guarantee (see above).
UNSAMPLED = "unsampled"


class PrivacyBudgetExhausted(RuntimeError):
    """Raised (by the optimizer) when one more step would exceed the target epsilon."""


class LastIterateUnavailable(ValueError):
    """The last-iterate bound does not apply to this run; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def default_neighboring(sampling: str) -> str:
    """The adjacency each sampling's proof covers: add/remove for Poisson (plain or cyclic, whose
    partitions are drawn per example), zero-out otherwise."""
    return "add_remove" if sampling in POISSON_SAMPLINGS else "zero_out"


def check_neighboring(neighboring: str | None, sampling: str) -> str:
    """``neighboring`` resolved for ``sampling`` (None: its default).

    Raises:
        ValueError: an unknown name, or add/remove with cyclic/shuffled batches (docs/design.md §7:
            removing an example re-cuts every later batch of the epoch, so the per-epoch Gaussian
            bound does not cover it).
    """
    if neighboring is None:
        return default_neighboring(sampling)
    check_choice("neighboring", neighboring, NEIGHBORINGS)
    if neighboring == "add_remove" and sampling not in POISSON_SAMPLINGS:
        raise ValueError(
            f"neighboring='add_remove' is not proven for sampling={sampling!r}: removing one "
            "example and cutting the remaining N-1 into batches again changes the membership of "
            "every later batch of the epoch (each step may differ by up to 2C), so one Gaussian per "
            "epoch does not bound it. Use neighboring='zero_out' (the default for cyclic/shuffle: "
            "the example is replaced by one with zero gradient, every other example keeps its "
            "slot; same epsilon), 'replace_one' (sensitivity 2C), or sampling='poisson'"
        )
    return neighboring


def warn_if_delta_not_small(delta: float, num_samples: int | None, *, stacklevel: int = 3) -> None:
    """A UserWarning when delta >= 1/N: such a delta allows releasing an example in the clear.

    The mechanism that publishes one random example of N whole is (0, 1/N)-DP, so a guarantee with
    delta >= 1/N rules out nothing an attacker cares about; the usual advice is delta << 1/N (e.g.
    1e-5 for N = 60000). The epsilon computed for such a delta is right; only the claim is empty.
    """
    if num_samples is None or num_samples < 1 or delta < 1.0 / num_samples:
        return
    warnings.warn(
        f"delta={delta:g} is >= 1/N = 1/{num_samples} (N = {num_samples} examples in the dataset): "
        "an (epsilon, delta) guarantee with delta >= 1/N allows releasing an example in the clear "
        "(publishing one random example of N is (0, 1/N)-DP), so it protects nothing; use "
        f"delta << 1/N (e.g. delta <= {_suggested_delta(num_samples):g})",
        UserWarning, stacklevel=stacklevel)


def _suggested_delta(num_samples: int) -> float:
    """A power of ten at least ten times below 1/N."""
    return 10.0 ** math.floor(math.log10(0.1 / num_samples))


@dataclass(frozen=True, kw_only=True)
class SampledStep:
    """One logical step as a dp_accounting event.

    Attributes:
        event: ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` (Poisson; q b for cyclic
            Poisson), ``TruncatedSubsampledGaussianDpEvent(N, q, K, sigma)`` (Poisson truncated
            to K) or ``GaussianDpEvent(sigma)`` (cyclic/shuffle); sigma is sigma_eff with adaptive
            clipping, and divided by the strategy's largest column norm with BandMF.
            ``NonPrivateDpEvent()`` for a step with no guarantee (:meth:`unsampled`).
        sampling: "poisson", "cyclic", "shuffle" or "cyclic_poisson"; ``UNSAMPLED``
            ("unsampled") for a step on batches no private data loader drew.
        epoch: the epoch (0-based) within its phase: cyclic/shuffled steps of one (phase, epoch)
            compose as one Gaussian.
        batch_size: b for cyclic/shuffle (None for Poisson).
        examples: examples in the logical batch (reported, never used in the bound).
        adaptive_clipping: the step also released noisy unclipped counts (folded into sigma).
        phase: the sampling run (0-based) the step belongs to; the accountant stamps it (see the
            module docstring).
        cycle: cyclic Poisson: the cycle of b steps (within the phase) the step belongs to; an
            example joins at most one step of a cycle. None for other samplings.
        bands: BandMF bands of the noise (1: independent noise, DP-SGD).
        strategy: the BandMF strategy ("sqrt", "optimized") when bands > 1, else None.
    """

    event: dp_accounting.DpEvent
    sampling: str
    epoch: int = 0
    batch_size: int | None = None
    examples: int = 0
    adaptive_clipping: bool = False
    phase: int = 0
    cycle: int | None = None
    bands: int = 1
    strategy: str | None = None

    def __post_init__(self) -> None:
        if self.sampling == UNSAMPLED:
            self._check_unsampled()
            return
        check_choice("sampling", self.sampling, SAMPLINGS)
        self._check_event()
        if self.sampling == "cyclic_poisson" and (self.cycle is None or self.cycle < 0):
            raise ValueError(f"SampledStep: sampling='cyclic_poisson' needs a cycle >= 0; got "
                             f"{self.cycle!r}")
        if self.bands < 1 or (self.bands > 1 and self.sampling not in ("cyclic_poisson", "cyclic")):
            # The BandMF bound needs an example's steps >= b apart: only these samplers keep them.
            raise ValueError(
                f"SampledStep: bands={self.bands} needs sampling 'cyclic_poisson' or 'cyclic' "
                f"(steps of an example at least b apart); got sampling={self.sampling!r}")
        poisson = self.sampling in POISSON_SAMPLINGS
        if not self.noise_multiplier >= 0:
            raise ValueError(f"SampledStep: noise multiplier must be >= 0; got {self.noise_multiplier!r}")
        if poisson and not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(f"SampledStep: sample rate must be in [0, 1]; got {self.sample_rate!r}")
        if self.truncated and (self.max_batch_size < 1 or self.dataset_size < 1):
            raise ValueError(f"SampledStep: a truncated Poisson step needs K >= 1 and N >= 1; got "
                             f"{self.event!r}")
        if not poisson and (self.batch_size is None or self.batch_size < 1):
            raise ValueError(
                f"SampledStep: sampling={self.sampling!r} needs batch_size >= 1; got {self.batch_size!r}")
        if self.epoch < 0:
            raise ValueError(f"SampledStep: epoch must be >= 0; got {self.epoch!r}")
        if self.phase < 0:
            raise ValueError(f"SampledStep: phase must be >= 0; got {self.phase!r}")

    def _check_event(self) -> None:
        event = self.event
        if self.sampling == "poisson":
            ok = isinstance(event, dp_accounting.TruncatedSubsampledGaussianDpEvent) or (
                isinstance(event, dp_accounting.PoissonSampledDpEvent)
                and isinstance(event.event, dp_accounting.GaussianDpEvent))
            needed = ("PoissonSampledDpEvent(q, GaussianDpEvent(sigma)) or "
                      "TruncatedSubsampledGaussianDpEvent(N, q, K, sigma)")
        elif self.sampling == "cyclic_poisson":
            ok = (isinstance(event, dp_accounting.PoissonSampledDpEvent)
                  and isinstance(event.event, dp_accounting.GaussianDpEvent))
            needed = "PoissonSampledDpEvent(q b, GaussianDpEvent(sigma))"
        else:
            ok = type(event) is dp_accounting.GaussianDpEvent
            needed = "GaussianDpEvent(sigma)"
        if not ok:
            raise ValueError(f"SampledStep: sampling={self.sampling!r} needs {needed}; got {event!r}")

    def _check_unsampled(self) -> None:
        if not isinstance(self.event, dp_accounting.NonPrivateDpEvent):
            raise ValueError(f"SampledStep: sampling={UNSAMPLED!r} needs NonPrivateDpEvent(); got "
                             f"{self.event!r}")
        if self.epoch < 0 or self.phase < 0:
            raise ValueError(f"SampledStep: epoch and phase must be >= 0; got {self.epoch!r}, "
                             f"{self.phase!r}")

    @property
    def guaranteed(self) -> bool:
        """False for a step on batches no private data loader drew (:meth:`unsampled`)."""
        return self.sampling != UNSAMPLED

    @classmethod
    def unsampled(cls, *, examples: int = 0) -> SampledStep:
        """A step on batches no private data loader drew: no guarantee, epsilon infinite.

        ``examples``: those that went through its backward passes (reported, never used)."""
        return cls(event=dp_accounting.NonPrivateDpEvent(), sampling=UNSAMPLED, examples=examples)

    @classmethod
    def of(cls, batch: LogicalBatch, noise_multiplier: float, *,
           adaptive_clipping: bool = False, bands: int = 1,
           strategy: str | None = None) -> SampledStep:
        """The event of the logical batch the sampler drew, released with ``noise_multiplier``
        (already divided by the BandMF strategy's largest column norm)."""
        return cls(event=batch.dp_event(noise_multiplier), sampling=batch.sampling,
                   epoch=batch.epoch, batch_size=batch.batch_size, examples=batch.logical_size,
                   adaptive_clipping=adaptive_clipping, cycle=batch.cycle, bands=bands,
                   strategy=strategy if bands > 1 else None)

    @property
    def truncated(self) -> bool:
        """A truncated Poisson step (``TruncatedSubsampledGaussianDpEvent``)."""
        return isinstance(self.event, dp_accounting.TruncatedSubsampledGaussianDpEvent)

    @property
    def noise_multiplier(self) -> float:
        """sigma; 0 for a step with no guarantee (as if it released its gradient unnoised, which
        is the conservative reading for any sum over sigmas)."""
        if not self.guaranteed:
            return 0.0
        if self.truncated:
            return float(self.event.noise_multiplier)
        return float(_gaussian_of(self.event).noise_multiplier)

    @property
    def sample_rate(self) -> float | None:
        """The rate of the event: q (Poisson, truncated or not), q b (cyclic Poisson)."""
        if isinstance(self.event, (dp_accounting.PoissonSampledDpEvent,
                                   dp_accounting.TruncatedSubsampledGaussianDpEvent)):
            return float(self.event.sampling_probability)
        return None

    @property
    def max_batch_size(self) -> int | None:
        """K of a truncated Poisson step, else None."""
        return int(self.event.truncated_batch_size) if self.truncated else None

    @property
    def dataset_size(self) -> int | None:
        """N of a truncated Poisson step (its analysis depends on it), else None."""
        return int(self.event.dataset_size) if self.truncated else None

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "event"}
        out = {**out, "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate}
        if self.truncated:
            out.update(max_batch_size=self.max_batch_size, dataset_size=self.dataset_size)
        return out

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> SampledStep:
        if state["sampling"] == UNSAMPLED:
            return cls(event=dp_accounting.NonPrivateDpEvent(), sampling=UNSAMPLED,
                       epoch=int(state.get("epoch", 0)), examples=int(state.get("examples", 0)),
                       phase=int(state.get("phase", 0)))
        sigma = float(state["noise_multiplier"])
        gaussian = dp_accounting.GaussianDpEvent(sigma)
        if state.get("max_batch_size") is not None:
            event = dp_accounting.TruncatedSubsampledGaussianDpEvent(
                dataset_size=int(state["dataset_size"]),
                sampling_probability=float(state["sample_rate"]),
                truncated_batch_size=int(state["max_batch_size"]), noise_multiplier=sigma)
        elif state["sampling"] in POISSON_SAMPLINGS:
            event = dp_accounting.PoissonSampledDpEvent(float(state["sample_rate"]), gaussian)
        else:
            event = gaussian
        fields = ("sampling", "epoch", "batch_size", "examples", "adaptive_clipping")
        # A ledger saved before phases (or BandMF) were recorded has none: the accountant infers
        # the phases; such a ledger had independent noise.
        return cls(event=event, phase=int(state.get("phase", 0)), cycle=state.get("cycle"),
                   bands=int(state.get("bands", 1)), strategy=state.get("strategy"),
                   **{k: state[k] for k in fields})


def _gaussian_of(event: dp_accounting.DpEvent):
    if isinstance(event, dp_accounting.PoissonSampledDpEvent):
        return event.event
    return event


@dataclass(frozen=True, kw_only=True)
class IterateFacts:
    """What the last-iterate bound needs to know of a step besides its event (docs/design.md §7.4).

    The step applies x <- (1 - eta lambda_g) x_g - (eta / B_norm) (S + noise) to every parameter
    group g, S being the sum of the batch's clipped gradients (norm <= C each) and the noise
    N(0, sigma^2 C^2 I).

    Attributes:
        position_in_epoch: logical batch index within the epoch (0-based).
        batches_per_epoch: logical batches per epoch.
        learning_rate: eta, when known (one for all parameter groups).
        weight_decays: SGD ``weight_decay`` (lambda_g) of every parameter group.
        loss_reduction: "mean" or "sum", how the loss reduced over the batch (None: unknown).
        normalizer: B_norm the noised sum was divided by (b for a mean loss under cyclic
            sampling, 1 for a summed one); None when unknown.
        max_grad_norm: C of the step, sqrt(sum_g C_g^2) of the thresholds the sums were clipped
            with; None when unknown.
        plain_sgd: True iff the optimizer is ``torch.optim.SGD`` with momentum 0, no Nesterov,
            ``maximize=False`` and one learning rate.
        clipping_function: "standard" (min(1, C / ||g||): a projection, 1-Lipschitz) or
            "automatic" (C g / (||g|| + gamma): C / gamma-Lipschitz, which the bound refuses).

    A ledger saved before dpfused recorded ``loss_reduction``, ``normalizer`` and ``max_grad_norm``
    (or facts built without them) has None there: the last-iterate bound refuses such steps.
    """

    position_in_epoch: int = 0
    batches_per_epoch: int = 1
    learning_rate: float | None = None
    weight_decays: tuple[float, ...] = (0.0,)
    loss_reduction: str | None = None
    normalizer: float | None = None
    max_grad_norm: float | None = None
    plain_sgd: bool = False
    clipping_function: str = "standard"

    def __post_init__(self) -> None:
        if self.batches_per_epoch < 1 or not 0 <= self.position_in_epoch < self.batches_per_epoch:
            raise ValueError(
                "IterateFacts: need 0 <= position_in_epoch < batches_per_epoch; got "
                f"position_in_epoch={self.position_in_epoch}, batches_per_epoch={self.batches_per_epoch}"
            )
        if self.learning_rate is not None and not (self.learning_rate >= 0):
            raise ValueError(f"IterateFacts: learning_rate must be >= 0 or None; got {self.learning_rate!r}")
        decays = _decays_tuple(self.weight_decays)
        object.__setattr__(self, "weight_decays", decays)
        if self.loss_reduction is not None:
            check_choice("IterateFacts: loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        for name in ("normalizer", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"IterateFacts: {name} must be a finite number > 0 or None; got {value!r}")

    @property
    def weight_decay_range(self) -> tuple[float, float]:
        """(smallest, largest) lambda_g: the contraction of phi_k needs both (docs/design.md §7.4)."""
        return min(self.weight_decays), max(self.weight_decays)

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> IterateFacts:
        """Facts saved by ``asdict``; an older ledger's single ``weight_decay`` (then the largest of
        the groups', which the bound cannot use) is kept as the only value, and the fields it
        lacks stay None, so the bound refuses those steps."""
        state = dict(state)
        if "weight_decay" in state:
            state["weight_decays"] = (state.pop("weight_decay"),)
        return cls(**state)


def _decays_tuple(weight_decays) -> tuple[float, ...]:
    if isinstance(weight_decays, (int, float)) or not isinstance(weight_decays, Sequence):
        raise TypeError(f"IterateFacts: weight_decays must be a sequence (one lambda per parameter "
                        f"group); got {weight_decays!r}")
    decays = tuple(float(w) for w in weight_decays)
    if not decays or not all(math.isfinite(w) and w >= 0 for w in decays):
        raise ValueError(f"IterateFacts: weight_decays must hold at least one finite lambda >= 0; "
                         f"got {weight_decays!r}")
    return decays


@dataclass(frozen=True)
class LedgerEntry:
    """One logical step in the ledger: its event and its last-iterate facts."""

    sampled: SampledStep
    iterate: IterateFacts

    def to_dict(self) -> dict[str, Any]:
        return {"sampled": self.sampled.to_dict(), "iterate": asdict(self.iterate)}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> LedgerEntry:
        return cls(SampledStep.from_dict(state["sampled"]), IterateFacts.from_dict(state["iterate"]))
