"""The accountant: a ledger of one entry per logical step and the epsilons it implies (§7)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import dp_accounting

from dpfused.accounting.composition import (
    composed_dp_event,
    composed_epsilon,
    epoch_sigmas,
    poisson_runs,
    truncated_runs,
)
from dpfused.accounting.last_iterate import (
    LastIterateBound,
    gaussian_rdp_epsilon,
    last_iterate_of_entries,
)
from dpfused.accounting.records import (
    MECHANISMS,
    NEIGHBORINGS,
    IterateFacts,
    LedgerEntry,
    SampledStep,
    check_neighboring,
    default_neighboring,
)
from dpfused.arguments import check_choice, check_delta

__all__ = ["PrivacyAccountant"]


class PrivacyAccountant:
    """A ledger of :class:`LedgerEntry` (a DpEvent and last-iterate facts per step).

    Args:
        mechanism: "pld" (dp_accounting's PLD accountant, default, tighter) or "rdp".
        neighboring: None (default: each sampling's own adjacency, add/remove for Poisson and
            zero-out for cyclic/shuffle), or "add_remove" (Poisson steps only), "zero_out" or
            "replace_one" (sensitivity 2C) for every step.

    Raises:
        ValueError: unknown mechanism or neighboring.
    """

    def __init__(self, *, mechanism: str = "pld", neighboring: str | None = None):
        self._mechanism = check_choice("mechanism", mechanism, MECHANISMS)
        if neighboring is not None:
            check_choice("neighboring", neighboring, NEIGHBORINGS)
        self._configured = neighboring
        self._entries: list[LedgerEntry] = []
        self._phase = 0
        self._cache: dict[tuple, float] = {}
        self._certificate = None  # truncated steps certified within a budget (_certified)

    # -- ledger ----------------------------------------------------------------------------------
    @property
    def mechanism(self) -> str:
        return self._mechanism

    @property
    def neighboring(self) -> str:
        """The adjacency the ledger's epsilon is stated for (per sampling when not configured)."""
        if self._configured is not None:
            return self._configured
        names = sorted({default_neighboring(e.sampled.sampling) for e in self._entries
                        if e.sampled.guaranteed})
        if len(names) == 2:
            return "add_remove (Poisson steps) / zero_out (cyclic/shuffle steps)"
        return names[0] if names else "add_remove"

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        return tuple(self._entries)

    @property
    def steps(self) -> int:
        """Logical steps recorded."""
        return len(self._entries)

    @property
    def epochs_started(self) -> int:
        """Distinct (phase, epoch) pairs in which at least one step was recorded."""
        return len({(e.sampled.phase, e.sampled.epoch) for e in self._entries
                    if e.sampled.guaranteed})

    @property
    def first_unguaranteed_step(self) -> int | None:
        """Index (0-based) of the first step with no guarantee (on batches no private data loader
        drew: ``SampledStep.unsampled``); every epsilon from it on is infinite. None if none."""
        return next((k for k, e in enumerate(self._entries) if not e.sampled.guaranteed), None)

    @property
    def phase(self) -> int:
        """The phase the next recorded step belongs to (see :meth:`begin_phase`)."""
        return self._phase

    def begin_phase(self) -> None:
        """Steps recorded from now on belong to a new sampling run (a new private data loader).

        A new loader counts its epochs from 0 again, and its epochs use every example again: they
        must not merge with the earlier epochs of the same number (docs/design.md §7.2). The
        engine calls this when ``make_private`` is called on an engine whose ledger is not empty.
        Nothing changes while the current phase has no step.
        """
        if any(e.sampled.phase == self._phase for e in self._entries):
            self._phase += 1

    def record(self, sampled: SampledStep, iterate: IterateFacts | None = None) -> None:
        """Append one logical step to the ledger.

        Raises:
            TypeError: not a SampledStep / IterateFacts.
            ValueError: the step's sampling is not covered by the configured adjacency.
        """
        self._entries.append(self._entry(sampled, iterate))

    def _entry(self, sampled, iterate) -> LedgerEntry:
        if not isinstance(sampled, SampledStep):
            raise TypeError(f"record expects a SampledStep; got {type(sampled).__name__}.")
        iterate = IterateFacts() if iterate is None else iterate
        if not isinstance(iterate, IterateFacts):
            raise TypeError(f"record expects IterateFacts; got {type(iterate).__name__}.")
        if sampled.guaranteed:  # a step with no guarantee is covered by no adjacency at all
            check_neighboring(self._configured, sampled.sampling)
        if sampled.phase != self._phase:  # the accountant, not the caller, says which run it is
            sampled = dataclasses.replace(sampled, phase=self._phase)
        return LedgerEntry(sampled, iterate)

    def dp_event(self) -> dp_accounting.DpEvent:
        """The ledger as one dp_accounting event (Poisson steps; one Gaussian per cyclic epoch)."""
        return composed_dp_event([e.sampled for e in self._entries])

    # -- composed epsilon ------------------------------------------------------------------------
    def _composition_neighboring(self) -> str:
        # Zero-out and add/remove both move the clipped sum by at most C: the same numbers.
        return "replace_one" if self._configured == "replace_one" else "add_remove"

    def _epsilon_of(self, entries: Sequence[LedgerEntry], delta: float) -> float:
        delta = check_delta(delta)
        steps = [e.sampled for e in entries]
        if not all(s.guaranteed for s in steps):
            return math.inf  # a step on batches no private data loader drew: no guarantee
        runs, sigmas, cut = poisson_runs(steps), epoch_sigmas(steps), truncated_runs(steps)
        # Identical summaries give identical epsilons: a budget check before a step and the
        # report after it usually share one computation.
        key = (tuple(sorted(runs.items())), tuple(sorted(sigmas)), tuple(sorted(cut.items())),
               delta)
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = composed_epsilon(
                poisson=runs, epoch_noise=sigmas, delta=delta, mechanism=self._mechanism,
                neighboring=self._composition_neighboring(), truncated=cut,
            )
        return self._cache[key]

    def get_epsilon(self, delta: float) -> float:
        """Composed epsilon of the ledger (every iterate released).

        Raises:
            ValueError: delta not in (0, 1).
        """
        return self._epsilon_of(self._entries, delta)

    def get_epsilon_if(self, sampled: SampledStep, delta: float) -> float:
        """Composed epsilon after one more, prospective, step (for budget checks)."""
        return self._epsilon_of([*self._entries, self._entry(sampled, None)], delta)

    def epsilon_if_over_budget(
        self, sampled: SampledStep, delta: float, max_epsilon: float
    ) -> float | None:
        """Epsilon after step ``sampled`` if it would exceed ``max_epsilon``, else None.

        The exact (PLD) composition costs a fraction of a second per call on long runs. RDP is
        also a valid upper bound on the true epsilon and costs microseconds: when it is already
        within budget the step is safe whatever PLD says, and PLD runs only near the budget.
        RDP does not bound truncated Poisson steps; for them a PLD epsilon computed ahead, with
        a quarter more truncated steps than the ledger has, certifies every step up to that count
        (composing more steps never lowers epsilon), so PLD runs O(log T) times, not every step.
        """
        entries = [*self._entries, self._entry(sampled, None)]
        if not all(e.sampled.guaranteed for e in entries):
            return math.inf  # no guarantee exceeds any budget (the RDP screen below skips it)
        steps = [e.sampled for e in entries]
        cut = truncated_runs(steps)
        if (self._mechanism == "pld" and self._composition_neighboring() == "add_remove"
                and not cut):
            screen = composed_epsilon(
                poisson=poisson_runs(steps), epoch_noise=epoch_sigmas(steps),
                delta=delta, mechanism="rdp", neighboring="add_remove",
            )
            if screen <= max_epsilon:
                return None
        if cut and self._certified(steps, cut, delta, max_epsilon):
            return None
        epsilon = self._epsilon_of(entries, delta)
        return epsilon if epsilon > max_epsilon else None

    def _certified(self, steps, cut, delta, max_epsilon) -> bool:
        """Truncated steps: within a budget certified ahead (see ``epsilon_if_over_budget``)."""
        rest = (tuple(sorted(poisson_runs(steps).items())), tuple(sorted(epoch_sigmas(steps))),
                delta, max_epsilon)
        safe = self._certificate
        if safe is not None and safe[0] == rest and set(cut) <= set(safe[1]) and all(
                n <= safe[1][key] for key, n in cut.items()):
            return True
        ahead = {key: n + max(1, n // 4) for key, n in cut.items()}
        epsilon = composed_epsilon(poisson=poisson_runs(steps), epoch_noise=epoch_sigmas(steps),
                                   delta=delta, mechanism=self._mechanism,
                                   neighboring=self._composition_neighboring(), truncated=ahead)
        if epsilon > max_epsilon:
            return False
        self._certificate = (rest, ahead)
        return True

    # -- last-iterate epsilon --------------------------------------------------------------------
    def last_iterate_bound(
        self, *, smoothness: float | None = None, convex: bool = False
    ) -> LastIterateBound:
        """The shifted-Rényi bound (rho and worst position) of the ledger.

        Raises:
            LastIterateUnavailable: the run is not cyclic plain SGD with known learning rates, or
                L is missing (see :func:`get_last_iterate_epsilon`).
        """
        return last_iterate_of_entries(
            self._entries, smoothness=smoothness, convex=convex,
            neighboring=self.last_iterate_neighboring,
        )

    @property
    def last_iterate_neighboring(self) -> str:
        """The last-iterate bound covers cyclic runs: zero-out, or replace-one when configured."""
        return "replace_one" if self._configured == "replace_one" else "zero_out"

    def get_last_iterate_epsilon(
        self, delta: float, *, smoothness: float | None = None, convex: bool = False
    ) -> float:
        """Epsilon when only the final model is released (docs/design.md §7).

        Args:
            delta: target delta, 0 < delta < 1.
            smoothness: L, every per-example loss is L-smooth. Required unless ``convex``.
            convex: the user asserts convex losses, clipping never active, learning rates <= 2/L
                (checked when ``smoothness`` is given).

        Raises:
            LastIterateUnavailable: sampling not cyclic, optimizer not plain SGD, learning rate
                unknown, a step without its loss reduction, B_norm or C (an older ledger), several
                phases, L missing or <= 0, or a learning rate above 2/L_k with ``convex``.
            ValueError: delta not in (0, 1).
        """
        delta = check_delta(delta)
        bound = self.last_iterate_bound(smoothness=smoothness, convex=convex)
        return gaussian_rdp_epsilon(bound.rho, delta)

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The ledger, as plain Python data."""
        return {
            "version": 3,
            "mechanism": self._mechanism,
            "neighboring": self._configured,
            "entries": [e.to_dict() for e in self._entries],
            "phase": self._phase,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the ledger saved by :meth:`state_dict`.

        Raises:
            ValueError: the state was saved with another mechanism or neighboring relation.
        """
        for name, ours in (("mechanism", self._mechanism), ("neighboring", self._configured)):
            if state[name] != ours:
                raise ValueError(
                    f"load_state_dict: the saved ledger used {name}={_described(state[name])} "
                    f"but this accountant uses {_described(ours)}; build the accountant with "
                    f"{name}={state[name]!r}."
                )
        entries = state.get("entries")
        if not isinstance(entries, (list, tuple)):
            raise ValueError("load_state_dict: the saved ledger's entries must be a list (from "
                             f"state_dict()); got {type(entries).__name__}")
        entries = [LedgerEntry.from_dict(e) for e in entries]
        if "phase" not in state:  # saved before phases were recorded (version <= 2)
            entries = _with_inferred_phases(entries)
        self._entries = entries
        # Never below a recorded phase: later steps must not merge into an earlier run's epochs.
        latest = max((e.sampled.phase for e in entries), default=0)
        self._phase = max(int(state.get("phase", latest)), latest)
        self._cache.clear()
        self._certificate = None


def _with_inferred_phases(entries: list[LedgerEntry]) -> list[LedgerEntry]:
    """Phases of a ledger saved before they were recorded.

    Within one data loader the steps' (epoch, position in epoch) strictly increase (a resumed run
    continues where it stopped); a step that does not come after the one before it was drawn by a
    new loader, which counts its epochs from 0 again. Such a ledger merged those epochs with the
    earlier ones of the same number (the bug phases fix); splitting them again here is the
    conservative reading.
    """
    out, phase, previous = [], 0, None
    for entry in entries:
        key = (entry.sampled.epoch, entry.iterate.position_in_epoch)
        if previous is not None and key <= previous:
            phase += 1
        previous = key
        out.append(LedgerEntry(dataclasses.replace(entry.sampled, phase=phase), entry.iterate))
    return out


def _described(setting) -> str:
    """A ledger setting for a message: None (neighboring) is each sampling's own default."""
    return "None (each sampling's default relation)" if setting is None else repr(setting)
