"""Last-iterate epsilon (only the final model released): pure functions (docs/design.md §7).

Cyclic sampling and plain SGD only: the shifted Rényi divergence bound of Feldman, Mironov, Talwar &
Thakurta (2018, Thm 22 and 34), in the form docs/design.md §7 states it, converted to
(epsilon, delta) with dp_accounting's RDP conversion. Its adjacency is zero-out (the differing
example's own steps shift by eta*C/B_norm: B_norm = b for a mean loss, 1 for a summed one) or
replace-one (twice that). Every step's learning rate, weight decays, B_norm, C and sigma come from
the ledger, so schedulers of any of them are covered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import dp_accounting
from dp_accounting import rdp as dp_rdp

from dpfused.accounting.records import (
    NEIGHBORINGS,
    LastIterateUnavailable,
    LedgerEntry,
)
from dpfused.arguments import check_choice, check_delta

__all__ = [
    "LastIterateBound",
    "contraction_factors",
    "gaussian_rdp_epsilon",
    "last_iterate_assumptions",
    "last_iterate_bound",
    "last_iterate_of_entries",
    "window_rho",
]


@dataclass(frozen=True)
class LastIterateBound:
    """Shifted-Rényi bound on the last iterate: RDP_last(alpha) = alpha * rho.

    Attributes:
        rho: the worst position's Rényi coefficient (inf if some step had no noise).
        worst_position: the batch position (0-based) of the worst example; None without steps.
        rho_per_position: rho of every batch position 0..m-1 (0 for positions never used).
    """

    rho: float
    worst_position: int | None
    rho_per_position: tuple[float, ...]

    @property
    def sigma_effective(self) -> float:
        """Noise multiplier of the Gaussian mechanism with the same Rényi curve, 1/sqrt(2 rho)."""
        if self.rho == 0:
            return math.inf
        return 1.0 / math.sqrt(2.0 * self.rho)



def contraction_factors(
    learning_rates: np.ndarray,
    weight_decays,
    *,
    smoothness: float | None,
    convex: bool,
    gradient_scales: np.ndarray | None = None,
) -> np.ndarray:
    """Lipschitz constant c_k of every step's update map phi_k (docs/design.md §7.4).

    phi_k(x)_g = (1 - eta_k lambda_g) x_g - (eta_k / B_norm) sum_{i in batch} clip(grad l_i(x))_g
    over parameter groups g. The batch sum is (b L)-Lipschitz (clip is 1-Lipschitz), so with
    L_k = (b / B_norm) L, the ``gradient_scales`` times L (1 for a mean loss, B_norm = b; b for a
    summed one, B_norm = 1):

    Smooth (nonconvex) losses: c_k = max_g |1 - eta_k lambda_g| + eta_k L_k. A group without weight
    decay does not contract, whatever the others do: the largest factor counts.

    Convex losses, clipping never active: phi_k is a gradient step on an objective whose Hessian
    lies between lambda_min and lambda_max + L_k, so
    c_k = max(|1 - eta_k lambda_min|, |1 - eta_k (lambda_max + L_k)|); that is 1 for lambda = 0 and
    eta_k L_k <= 2. Without a known L the user's assertion eta_k L_k <= 2 allows any
    L_k <= 2/eta_k; the worst gives c_k = max(|1 - eta_k lambda_min|, 1 + eta_k lambda_max).

    Args:
        learning_rates: eta_k per step.
        weight_decays: per step, lambda (a number) or every parameter group's lambda_g.
        smoothness: L of every per-example loss (None only with ``convex``).
        convex: the user asserts convex losses, clipping never active, eta_k L_k <= 2.
        gradient_scales: b / B_norm per step (default 1: a mean loss).
    """
    eta = np.asarray(learning_rates, dtype=np.float64)
    lam_min, lam_max = _decay_range(weight_decays, len(eta))
    scale = np.ones_like(eta) if gradient_scales is None else np.asarray(gradient_scales, np.float64)
    decay = np.maximum(np.abs(1.0 - eta * lam_min), np.abs(1.0 - eta * lam_max))
    if not convex:
        return decay + eta * scale * float(smoothness)
    if smoothness is None:
        return np.maximum(np.abs(1.0 - eta * lam_min), 1.0 + eta * lam_max)
    top = lam_max + scale * float(smoothness)
    return np.maximum(np.abs(1.0 - eta * lam_min), np.abs(1.0 - eta * top))


def _decay_range(weight_decays, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(smallest, largest) lambda of every step, from numbers or per-group sequences."""
    per_step = [np.atleast_1d(np.asarray(w, dtype=np.float64)) for w in weight_decays]
    if len(per_step) != steps:
        raise ValueError(f"weight_decays: {len(per_step)} steps, learning_rates: {steps}")
    return (np.array([w.min() for w in per_step]).reshape(steps),
            np.array([w.max() for w in per_step]).reshape(steps))


def window_rho(
    contractions: np.ndarray, noise_stds: np.ndarray, shift: float
) -> float:
    """Rényi coefficient of one window: RDP_window(alpha) = alpha * rho.

    The window runs over steps t0..t1 (the arrays' entries, in order). With
    w_k = prod_{j=k+1..t1} c_j, the cheapest shifts give
    rho = (1/2) (w_t0 * shift)^2 / sum_k w_k^2 s_k^2. Computed in log space: w_k can overflow
    (c > 1 over long windows) or vanish (c = 0).
    """
    c = np.asarray(contractions, dtype=np.float64)
    s = np.asarray(noise_stds, dtype=np.float64)
    if shift == 0:
        return 0.0
    with np.errstate(divide="ignore"):
        log_c = np.log(c)
        log_s = np.log(s)
    # log w_k = sum_{j>k} log c_j (suffix sums, excluding c_k itself); w_t1 = 1.
    suffix = np.concatenate([np.cumsum(log_c[::-1])[::-1][1:], [0.0]])
    log_num = 2.0 * (suffix[0] + math.log(shift))
    if log_num == -math.inf:
        return 0.0
    log_den = float(np.logaddexp.reduce(2.0 * (suffix + log_s)))
    if log_den == -math.inf:
        return math.inf
    return 0.5 * math.exp(log_num - log_den)


def last_iterate_bound(
    *,
    positions: Sequence[int],
    batches_per_epoch: int,
    learning_rates: Sequence[float],
    noise_multipliers: Sequence[float],
    weight_decays: Sequence,
    batch_size: int,
    smoothness: float | None,
    convex: bool = False,
    neighboring: str = "zero_out",
    normalizers: Sequence[float] | None = None,
    clip_norms: Sequence[float] | None = None,
) -> LastIterateBound:
    """Shifted-Rényi bound on the final iterate of cyclic DP-SGD (docs/design.md §7.4).

    Step k moves the parameters by (eta_k / B_norm,k) times the noised clipped sum: c_k from
    :func:`contraction_factors` (gradient scale b / B_norm,k), noise s_k = eta_k sigma_k C_k / B_norm,k
    and shift Delta_k = eta_k C_k / B_norm,k (zero-out; twice that for replace-one). The example at
    batch position p is used at the steps with that position; each use opens a window ending at the
    step before the next use or at the last step, and the position's rho sums its windows. The
    worst position is reported.

    Args:
        positions: batch position (0..m-1) of every step, in training order.
        batches_per_epoch: m.
        learning_rates, noise_multipliers: eta_k and sigma_k per step.
        weight_decays: per step, lambda or every parameter group's lambda_g.
        batch_size: the fixed logical batch size b.
        smoothness: L (None only with ``convex=True``).
        convex: the user asserts convex losses, clipping never active and eta_k L_k <= 2.
        neighboring: "zero_out" or "replace_one" (see ``last_iterate_neighboring``).
        normalizers: B_norm,k per step (default b: a mean loss; 1 for a summed loss).
        clip_norms: C_k per step (default 1; only ratios of C_k matter).

    Returns:
        The bound, with the worst position.
    """
    check_choice("neighboring", neighboring, NEIGHBORINGS)
    pos = np.asarray(positions, dtype=np.int64)
    eta = np.asarray(learning_rates, dtype=np.float64)
    sigma = np.asarray(noise_multipliers, dtype=np.float64)
    steps = len(pos)
    if steps == 0:
        return LastIterateBound(0.0, None, (0.0,) * batches_per_epoch)
    norm = np.full(steps, float(batch_size)) if normalizers is None else np.asarray(normalizers, np.float64)
    clip = np.ones(steps) if clip_norms is None else np.asarray(clip_norms, dtype=np.float64)
    c = contraction_factors(eta, weight_decays, smoothness=smoothness, convex=convex,
                            gradient_scales=batch_size / norm)
    step_size = eta / norm  # what multiplies the noised clipped sum
    s = step_size * sigma * clip
    shift = (2.0 if neighboring == "replace_one" else 1.0) * step_size * clip

    rho = np.zeros(batches_per_epoch)
    for p in range(batches_per_epoch):
        uses = np.flatnonzero(pos == p)
        ends = np.append(uses[1:] - 1, steps - 1)
        rho[p] = sum(
            window_rho(c[t0 : t1 + 1], s[t0 : t1 + 1], float(shift[t0]))
            for t0, t1 in zip(uses, ends)
        )
    # Ties go to the latest position: its last window is the shortest.
    worst = int(batches_per_epoch - 1 - np.argmax(rho[::-1]))
    return LastIterateBound(float(rho[worst]), worst, tuple(float(r) for r in rho))


def gaussian_rdp_epsilon(rho: float, delta: float) -> float:
    """(epsilon, delta) of the Rényi curve alpha * rho, via dp_accounting's RDP conversion.

    alpha * rho is the curve of a Gaussian mechanism with sigma = 1/sqrt(2 rho), so we compose
    ``GaussianDpEvent(sigma)`` into an ``RdpAccountant``. The PLD of that Gaussian would give a smaller
    epsilon, but it is not justified here: the shifted-Rényi argument bounds only the Rényi
    divergences of the two last iterates, not their privacy loss distribution, and a Rényi curve
    does not determine the (epsilon, delta) profile. The RDP -> DP conversion uses the curve alone.
    """
    delta = check_delta(delta)
    if rho == 0:
        return 0.0
    if not math.isfinite(rho):
        return math.inf
    accountant = dp_rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.0 / math.sqrt(2.0 * rho)))
    return float(accountant.get_epsilon(delta))


def _check_last_iterate(
    entries: Sequence[LedgerEntry], *, smoothness: float | None, convex: bool
) -> None:
    """Raise LastIterateUnavailable with the first reason the bound does not apply."""
    _check_run(entries)
    _check_smoothness(smoothness, convex)
    _check_fixed_order(entries, smoothness, convex)


def _check_run(entries: Sequence[LedgerEntry]) -> None:
    for k, (rec, it) in enumerate((e.sampled, e.iterate) for e in entries):
        if not rec.guaranteed:
            raise LastIterateUnavailable(
                f"step {k} ran on batches the private data loader did not draw: it has no "
                "privacy guarantee, so no epsilon is finite from that step on")
        if rec.sampling != "cyclic":
            why = (
                "a fresh permutation every epoch is not a fixed order"
                if rec.sampling == "shuffle"
                else "the bound has no amplification by Poisson sampling"
            )
            raise LastIterateUnavailable(
                f"last-iterate accounting needs cyclic sampling (one fixed order); step {k} used "
                f"sampling={rec.sampling!r} ({why}). Use sampling='cyclic' or report the composed "
                "epsilon."
            )
        if not it.plain_sgd:
            raise LastIterateUnavailable(
                f"last-iterate accounting needs plain SGD (torch.optim.SGD with momentum=0, "
                f"nesterov=False) descending the loss (maximize=False); step {k} used another "
                "optimizer (momentum, Nesterov, maximize or an adaptive method such as Adam are "
                "not covered)."
            )
        if rec.bands > 1:
            raise LastIterateUnavailable(
                f"last-iterate accounting needs independent noise at every step; step {k} used "
                f"BandMF's correlated noise ({rec.bands} bands), which the shifted-Renyi bound "
                "does not cover. Report the composed epsilon."
            )
        if it.clipping_function != "standard":
            raise LastIterateUnavailable(
                f"last-iterate accounting needs clipping that is 1-Lipschitz (a projection); step "
                f"{k} used clipping_function={it.clipping_function!r} (C g / (||g|| + gamma) is "
                "C / gamma-Lipschitz). Report the composed epsilon."
            )
        if rec.adaptive_clipping:
            raise LastIterateUnavailable(
                f"last-iterate accounting needs fixed clipping thresholds; step {k} adapted them "
                "from noisy counts (adaptive_clipping), so the update maps depend on released "
                "data. Report the composed epsilon, or train without adaptive_clipping."
            )
        if it.learning_rate is None:
            raise LastIterateUnavailable(
                f"last-iterate accounting needs every learning rate; step {k} has none recorded."
            )
        _check_step_scale_recorded(k, it)
    _check_one_phase(entries)


def _check_step_scale_recorded(k: int, it) -> None:
    missing = [name for name in ("loss_reduction", "normalizer", "max_grad_norm")
               if getattr(it, name) is None]
    if missing:
        raise LastIterateUnavailable(
            f"last-iterate accounting needs each step's loss reduction, normalizer B_norm and "
            f"clipping norm C (the step moves by eta*C/B_norm); step {k} has no {', '.join(missing)} "
            "recorded (a ledger saved by an older dpfused, or IterateFacts built without them). "
            "Report the composed epsilon."
        )


def _check_one_phase(entries: Sequence[LedgerEntry]) -> None:
    phases = sorted({e.sampled.phase for e in entries})
    if len(phases) > 1:
        raise LastIterateUnavailable(
            f"last-iterate accounting needs one fixed cyclic order for the whole run; this ledger "
            f"has {len(phases)} phases (make_private was called again on the engine, with a data "
            "loader whose order need not be the first one's). Report the composed epsilon, or "
            "train in one make_private."
        )


def _check_smoothness(smoothness: float | None, convex: bool) -> None:
    if not convex and (smoothness is None or not smoothness > 0):
        raise LastIterateUnavailable(
            "last-iterate accounting needs the smoothness constant L > 0 of the per-example losses "
            f"(got smoothness={smoothness!r}); pass smoothness=L, or convex=True if the losses are "
            "convex, clipping is never active and every step's eta*L*b/B_norm is <= 2 (eta <= 2/L "
            "for a mean loss)."
        )
    if convex and smoothness is not None and not smoothness > 0:
        raise LastIterateUnavailable(f"smoothness must be > 0 when given; got {smoothness!r}.")


def _check_fixed_order(entries: Sequence[LedgerEntry], smoothness: float | None, convex: bool) -> None:
    first = entries[0] if entries else None
    for k, entry in enumerate(entries):
        rec, it = entry.sampled, entry.iterate
        if (rec.batch_size != first.sampled.batch_size
                or it.batches_per_epoch != first.iterate.batches_per_epoch):
            raise LastIterateUnavailable(
                "last-iterate accounting needs one fixed batch size and batches per epoch; step "
                f"{k} has batch_size={rec.batch_size}, batches_per_epoch={it.batches_per_epoch} "
                f"but step 0 has {first.sampled.batch_size}, {first.iterate.batches_per_epoch}."
            )
        if convex and smoothness is not None:
            _check_convex_step(k, it, rec.batch_size, smoothness)


def _check_convex_step(k: int, it, batch_size: int, smoothness: float) -> None:
    """convex=True covers eta_k L_k <= 2, L_k = L b / B_norm the smoothness of the batch term."""
    limit = 2.0 * it.normalizer / (batch_size * smoothness)
    if it.learning_rate > limit:
        summed = "" if it.normalizer == batch_size else (
            f" (loss_reduction={it.loss_reduction!r}: the step is eta times the sum over "
            f"{batch_size} examples, divided by B_norm={it.normalizer:g})")
        raise LastIterateUnavailable(
            f"convex=True needs learning rates <= 2/L = {limit:.6g}{summed}; step {k} used "
            f"{it.learning_rate:.6g}."
        )


def last_iterate_of_entries(
    entries: Sequence[LedgerEntry], *, smoothness: float | None, convex: bool, neighboring: str
) -> LastIterateBound:
    """The bound of a ledger (checked first: LastIterateUnavailable says why it does not apply)."""
    _check_last_iterate(entries, smoothness=smoothness, convex=convex)
    if not entries:
        return LastIterateBound(0.0, None, ())
    return last_iterate_bound(
        positions=[e.iterate.position_in_epoch for e in entries],
        batches_per_epoch=entries[0].iterate.batches_per_epoch,
        learning_rates=[e.iterate.learning_rate for e in entries],
        noise_multipliers=[e.sampled.noise_multiplier for e in entries],
        weight_decays=[e.iterate.weight_decays for e in entries],
        batch_size=int(entries[0].sampled.batch_size),
        smoothness=smoothness,
        convex=convex,
        neighboring=neighboring,
        normalizers=[e.iterate.normalizer for e in entries],
        clip_norms=[e.iterate.max_grad_norm for e in entries],
    )


def last_iterate_assumptions(
    entries: Sequence[LedgerEntry], *, smoothness: float | None, convex: bool, worst: int | None,
    neighboring: str,
) -> list[str]:
    out = ["only the final model is released (intermediate iterates stay secret)"]
    if convex:
        bound = f"L={smoothness:g}" if smoothness is not None else "some L"
        out.append(
            f"every per-example loss is convex and {bound}-smooth, clipping is never active, and "
            "every step's eta*L*b/B_norm is <= 2 (eta <= 2/L for a mean loss)"
        )
    else:
        out.append(f"every per-example loss is L-smooth with L={smoothness:g}")
    out.append("plain SGD (torch.optim.SGD, momentum=0, nesterov=False, maximize=False), learning "
               "rates as recorded")
    if entries:
        out.append(
            f"fixed cyclic order: batch size {entries[0].sampled.batch_size}, "
            f"{entries[0].iterate.batches_per_epoch} batches per epoch, the same order every epoch"
        )
        out.append(_step_in_words(entries))
    by_mean = all(e.iterate.normalizer == e.sampled.batch_size for e in entries)
    scale = "eta*C/b" if by_mean else "eta*C/B_norm"
    shift = f"2*{scale} (replace-one)" if neighboring == "replace_one" else f"{scale} (zero-out)"
    out.append(f"the differing example shifts its own steps' update by at most {shift}")
    if worst is not None:
        out.append(f"worst example: batch position {worst} (0-based)")
    return out


def _step_in_words(entries: Sequence[LedgerEntry]) -> str:
    """What each step did, as the bound used it: reduction, B_norm, C and weight decays."""
    facts = [e.iterate for e in entries]
    reductions = sorted({f.loss_reduction for f in facts})
    norms = sorted({f.normalizer for f in facts})
    clips = sorted({f.max_grad_norm for f in facts})
    decays = sorted({w for f in facts for w in f.weight_decays})
    clip_text = (f"C={clips[0]:g}" if len(clips) == 1
                 else f"C from {clips[0]:g} to {clips[-1]:g} as recorded per step")
    return (f"each step: x <- (1 - eta*lambda_g) x - (eta/B_norm)(clipped sum + noise), loss "
            f"reduction {'/'.join(reductions)}, B_norm={'/'.join(f'{n:g}' for n in norms)}, "
            f"{clip_text}, weight decays {{{', '.join(f'{w:g}' for w in decays)}}} over the "
            "parameter groups (the largest contraction factor counts)")
