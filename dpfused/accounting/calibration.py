"""Calibration: the noise multiplier that spends a target epsilon (§7).

The schedule (steps, epochs) comes from the sampler's own rule (``batches_per_epoch``), so a
calibrated run and the run the sampler then draws agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import dp_accounting

from dpfused import privacy_math
from dpfused.accounting.composition import composed_epsilon
from dpfused.accounting.last_iterate import gaussian_rdp_epsilon, last_iterate_of_entries
from dpfused.accounting.records import (
    LOSS_REDUCTIONS,
    MECHANISMS,
    IterateFacts,
    LastIterateUnavailable,
    LedgerEntry,
    SampledStep,
    check_neighboring,
    warn_if_delta_not_small,
)
from dpfused.arguments import (
    check_choice,
    check_delta,
    check_max_batch_size,
    check_partitions_given,
    check_sample_rate,
    check_target_epsilon,
)
from dpfused.sampling.samplers import batches_per_epoch, poisson_rate_of_batch_size
from dpfused.step import SAMPLINGS, partition_sample_rate

__all__ = ["calibrate_noise_multiplier", "smallest_noise_multiplier"]


def smallest_noise_multiplier(
    epsilon_of: Callable[[float], float], target_epsilon: float, *, start: float = 1.0,
    factor: float = 2.0, rtol: float = 1e-3,
) -> float:
    """The smallest sigma (to relative tolerance ``rtol``) with ``epsilon_of(sigma) <=
    target_epsilon``: dpfused's one sigma search, for every calibration (this module's and the
    Opacus wing's ``get_noise_multiplier``). Why not dp_accounting's ``calibrate_dp_mechanism``:
    docs/design.md §7.5.

    Brackets from ``start`` by steps of ``factor``, then bisects geometrically; returns the
    conservative end of the final bracket, so ``epsilon_of(sigma) <= target_epsilon`` holds for the
    sigma returned, as ``epsilon_of`` computes it. ``epsilon_of`` must decrease in sigma.

    Raises:
        ValueError: no sigma <= 1e6 reaches ``target_epsilon``.
    """
    lo, hi = None, start
    while epsilon_of(hi) > target_epsilon:
        lo, hi = hi, factor * hi
        if hi > 1e6:
            raise ValueError(
                f"target_epsilon={target_epsilon} is not reachable with noise_multiplier <= 1e6."
            )
    if lo is None:
        lo = hi / factor
        while epsilon_of(lo) <= target_epsilon:
            hi, lo = lo, lo / factor
            if lo < 1e-6:
                return hi
    while hi - lo > rtol * hi:
        mid = math.sqrt(lo * hi)
        if epsilon_of(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def _calibrate_composed(
    *, target: float, delta: float, runs_of, mechanism: str, neighboring: str, screen_of=None
) -> float:
    """Bisection on the composed epsilon; ``runs_of(sigma)`` gives (poisson, epoch_noise) or
    (poisson, epoch_noise, truncated).

    The PLD accountant is slow far from the answer (large epsilons), so it starts from the RDP
    answer, which is close (RDP's conversion is looser, so usually a little above). RDP has no
    analysis of truncated Poisson steps: ``screen_of(sigma)`` then gives the same steps
    untruncated, whose PLD answer is a lower bound of the truncated one (truncation only adds
    privacy loss, so the search brackets upward from there).
    """

    def epsilon_with(mech, runs):
        def epsilon_of(sigma):
            poisson, epoch_noise, *truncated = runs(sigma)
            return composed_epsilon(poisson=poisson, epoch_noise=epoch_noise, delta=delta,
                                    mechanism=mech, neighboring=neighboring,
                                    truncated=truncated[0] if truncated else None)
        return epsilon_of

    sigma_rdp = smallest_noise_multiplier(epsilon_with("rdp", screen_of or runs_of), target)
    if mechanism == "rdp":
        return sigma_rdp
    if screen_of is None:
        return smallest_noise_multiplier(epsilon_with("pld", runs_of), target, start=sigma_rdp,
                                         factor=1.05)
    # Each truncated PLD costs seconds: start from the untruncated PLD answer, a lower bound.
    sigma_plain = smallest_noise_multiplier(epsilon_with("pld", screen_of), target,
                                            start=sigma_rdp, factor=1.05)
    return smallest_noise_multiplier(epsilon_with("pld", runs_of), target, start=sigma_plain,
                                     factor=1.1)


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sampling: str,
    sample_rate: float | None = None,
    num_samples: int | None = None,
    batch_size: int | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    mechanism: str = "pld",
    neighboring: str | None = None,
    last_iterate: Mapping[str, Any] | None = None,
    drop_last: bool = True,
    partitions: int | None = None,
    max_batch_size: int | None = None,
) -> float:
    """Noise multiplier sigma whose epsilon is at most ``target_epsilon`` (bisection, rtol 1e-3).

    Poisson: q = ``sample_rate`` or ``batch_size / num_samples``; steps = ``steps`` or ``epochs``
    times the sampler's steps per epoch; truncated to ``max_batch_size`` K, the steps are
    ``TruncatedSubsampledGaussianDpEvent(N, q, K, sigma)`` (PLD only). Cyclic Poisson with
    ``partitions`` b: ceil(steps / b) cycles, each ``PoissonSampledDpEvent(q b, ...)``. The sigma
    returned is the one the accountant records: with BandMF, sigma / max column norm (the engine
    multiplies it back). Cyclic/shuffle: epochs = ``epochs`` or ceil(steps / batches
    per epoch), each composing one Gaussian. With ``last_iterate`` (cyclic only) the last-iterate
    bound is calibrated instead of the composed one; its keys: ``smoothness`` (L),
    ``learning_rate`` (constant eta), ``weight_decay`` (lambda, or a list with every parameter
    group's lambda_g; default 0), ``loss_reduction`` ("mean", default, or "sum"), ``convex``
    (default False). The learning rate, weight decays, C and sigma are taken as constant: a
    scheduler that changes them changes the bound (the report gives the run's own).

    A UserWarning says so when ``num_samples`` is given and delta >= 1/num_samples (a guarantee
    that allows releasing an example in the clear).

    Returns:
        sigma with epsilon(sigma) <= target_epsilon, within 0.1% of the smallest such sigma.

    Raises:
        ValueError: bad or missing arguments, unknown mechanism/neighboring, target not reachable.
        LastIterateUnavailable: ``last_iterate`` asked for a setting the bound does not cover.
    """
    check_target_epsilon(target_epsilon)
    delta = check_delta(delta)
    warn_if_delta_not_small(delta, num_samples)
    check_choice("sampling", sampling, SAMPLINGS)
    check_choice("mechanism", mechanism, MECHANISMS)
    neighboring = check_neighboring(neighboring, sampling)
    composition = "replace_one" if neighboring == "replace_one" else "add_remove"
    if sample_rate is not None:
        check_sample_rate(sample_rate, sampling=sampling)
    check_max_batch_size(max_batch_size, sampling=sampling, accountant=mechanism)
    check_partitions_given(partitions, sampling=sampling)
    if sampling == "cyclic_poisson":
        rate, cycles = _cyclic_poisson_schedule(sample_rate, num_samples, batch_size, epochs,
                                                steps, last_iterate, partitions)
        return _calibrate_composed(
            target=target_epsilon, delta=delta, runs_of=lambda sigma: ({(rate, sigma): cycles}, []),
            mechanism=mechanism, neighboring=composition,
        )
    if sampling == "poisson":
        q, n = _poisson_schedule(sample_rate, num_samples, batch_size, epochs, steps, last_iterate)
        if max_batch_size is not None:
            size = _dataset_size_for_truncation(num_samples)
            return _calibrate_composed(
                target=target_epsilon, delta=delta,
                runs_of=lambda sigma: ({}, [], {(size, q, int(max_batch_size), sigma): n}),
                screen_of=lambda sigma: ({(q, sigma): n}, []),
                mechanism=mechanism, neighboring=composition,
            )
        return _calibrate_composed(
            target=target_epsilon, delta=delta, runs_of=lambda sigma: ({(q, sigma): n}, []),
            mechanism=mechanism, neighboring=composition,
        )
    per_epoch = _fixed_batches_per_epoch(num_samples, batch_size, drop_last)
    if last_iterate is not None:
        return _calibrate_last_iterate(target_epsilon, delta, sampling, batch_size, per_epoch,
                                       epochs, steps, last_iterate, neighboring)
    if epochs is None:
        if steps is None or per_epoch is None:
            raise ValueError(
                f"sampling={sampling!r} needs epochs, or steps with num_samples and batch_size.")
        epochs = -(-int(steps) // per_epoch)
    n_epochs = int(epochs)
    return _calibrate_composed(
        target=target_epsilon, delta=delta, runs_of=lambda sigma: ({}, [sigma] * n_epochs),
        mechanism=mechanism, neighboring=composition,
    )


def _poisson_schedule(sample_rate, num_samples, batch_size, epochs, steps, last_iterate):
    """(q, steps) of a Poisson run."""
    if last_iterate is not None:
        raise LastIterateUnavailable(
            "last-iterate accounting needs cyclic sampling (one fixed order); got "
            "sampling='poisson' (the bound has no amplification by Poisson sampling)."
        )
    if sample_rate is None:
        if batch_size is None or num_samples is None:
            raise ValueError("sampling='poisson' needs sample_rate, or batch_size and num_samples.")
        sample_rate = poisson_rate_of_batch_size(batch_size, num_samples)
    sample_rate = check_sample_rate(sample_rate)
    if steps is None:
        if epochs is None:
            raise ValueError("sampling='poisson' needs steps or epochs.")
        steps = int(epochs) * batches_per_epoch(sampling="poisson", sample_rate=sample_rate)
    return sample_rate, int(steps)


def _cyclic_poisson_schedule(sample_rate, num_samples, batch_size, epochs, steps, last_iterate,
                             partitions):
    """(q b, cycles) of a cyclic Poisson run: ceil(steps / b) cycles."""
    from dpfused.sampling.samplers import check_partitions

    q, _ = _poisson_schedule(sample_rate, num_samples, batch_size, 1, 1, last_iterate)
    if num_samples is None:
        raise ValueError("sampling='cyclic_poisson' needs num_samples (the partitions split it).")
    check_partitions(num_samples=num_samples, sample_rate=q, partitions=partitions)
    if steps is None:
        if epochs is None:
            raise ValueError("sampling='cyclic_poisson' needs steps or epochs.")
        steps = int(epochs) * batches_per_epoch(sampling="cyclic_poisson", sample_rate=q,
                                                partitions=partitions)
    return partition_sample_rate(q, partitions), -(-int(steps) // int(partitions))


def _dataset_size_for_truncation(num_samples) -> int:
    if num_samples is None:
        raise ValueError("truncated Poisson calibration needs num_samples (the analysis of "
                         "TruncatedSubsampledGaussianDpEvent depends on the dataset size).")
    return int(num_samples)


def _fixed_batches_per_epoch(num_samples, batch_size, drop_last) -> int | None:
    if num_samples is None or batch_size is None:
        return None
    if batch_size < 1 or (drop_last and batch_size > num_samples):
        raise ValueError(f"batch_size must be in [1, num_samples]; got {batch_size!r}.")
    return batches_per_epoch(sampling="cyclic", num_samples=num_samples, batch_size=batch_size,
                             drop_last=drop_last)


_LAST_ITERATE_KEYS = ("smoothness", "learning_rate", "weight_decay", "loss_reduction", "convex")


def _calibrate_last_iterate(target_epsilon, delta, sampling, batch_size, per_epoch, epochs, steps,
                            last_iterate, neighboring) -> float:
    """With a constant sigma, s_k is proportional to sigma and Delta_k is not, so
    rho(sigma) = rho(1) / sigma^2: one bound at sigma = 1, then bisection on the closed form."""
    if per_epoch is None:
        raise ValueError("last_iterate calibration needs num_samples and batch_size.")
    facts = _calibration_facts(last_iterate, per_epoch, batch_size)
    if epochs is None and steps is None:
        raise ValueError(f"sampling={sampling!r} needs epochs, or steps with num_samples and batch_size.")
    total = int(steps) if steps is not None else int(epochs) * per_epoch
    template = [
        LedgerEntry(
            SampledStep(event=dp_accounting.GaussianDpEvent(1.0), sampling=sampling,
                        epoch=k // per_epoch, batch_size=batch_size, examples=batch_size),
            IterateFacts(position_in_epoch=k % per_epoch, **facts),
        )
        for k in range(total)
    ]
    rho_1 = last_iterate_of_entries(
        template, smoothness=last_iterate.get("smoothness"),
        convex=bool(last_iterate.get("convex", False)),
        neighboring="replace_one" if neighboring == "replace_one" else "zero_out",
    ).rho
    return smallest_noise_multiplier(
        lambda sigma: gaussian_rdp_epsilon(rho_1 / sigma**2, delta), target_epsilon
    )


def _calibration_facts(last_iterate, per_epoch, batch_size) -> dict[str, Any]:
    """The IterateFacts of every planned step (C = 1: a constant C cancels)."""
    unknown = sorted(set(last_iterate) - set(_LAST_ITERATE_KEYS))
    if unknown:
        raise ValueError(f"last_iterate: unknown keys {unknown}; it takes {', '.join(_LAST_ITERATE_KEYS)}.")
    if "learning_rate" not in last_iterate:
        raise LastIterateUnavailable("last_iterate calibration needs a learning_rate.")
    reduction = check_choice("last_iterate['loss_reduction']",
                             last_iterate.get("loss_reduction", "mean"), LOSS_REDUCTIONS)
    decay = last_iterate.get("weight_decay", 0.0)
    decays = tuple(decay) if isinstance(decay, (list, tuple)) else (decay,)
    return dict(batches_per_epoch=per_epoch, learning_rate=float(last_iterate["learning_rate"]),
                weight_decays=decays, loss_reduction=reduction,
                normalizer=privacy_math.gradient_normalizer(loss_reduction=reduction,
                                                            expected_batch_size=batch_size),
                max_grad_norm=1.0, plain_sgd=True)
