"""Argument checks shared by the public entry points: one wording for one requirement."""

from __future__ import annotations

import math
import numbers

__all__ = ["check_number", "check_noise_multiplier", "check_max_grad_norm", "check_mechanism"]


def check_number(name, value, requirement, holds, *, hint=""):
    """A real number (not a bool, string or tensor) for which ``holds`` is true, or an error.

    Raises:
        TypeError: not a real number; ValueError: ``holds(value)`` is false.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {requirement}, got {value!r} ({type(value).__name__}){hint}")
    if not holds(float(value)):
        raise ValueError(f"{name} must be {requirement}, got {value!r}{hint}")


def check_noise_multiplier(value) -> None:
    check_number("noise_multiplier", value, "a finite number >= 0",
                 lambda v: math.isfinite(v) and v >= 0)


def check_max_grad_norm(value, *, hint="") -> None:
    check_number("max_grad_norm", value, "a finite number > 0",
                 lambda v: math.isfinite(v) and v > 0, hint=hint)


def check_mechanism(*, noise, sampling, max_batch_size, clipping_function, stability,
                    adaptive_clipping, accountant) -> None:
    """The choices of issue 22 and how they combine: BandMF noise, truncated Poisson sampling,
    automatic clipping (docs/design.md §4, §5.1, §6). Checked before anything is changed.

    Raises:
        TypeError / ValueError: naming the argument, what was found and the fix.
    """
    from dpfused import privacy_math
    from dpfused.bandmf import BandMF

    if noise is not None and not isinstance(noise, BandMF):
        raise TypeError(f"noise must be a dpfused.BandMF (or None for independent Gaussian noise), "
                        f"got {type(noise).__name__}")
    bands = 1 if noise is None else noise.bands
    if sampling == "cyclic_poisson" and noise is None:
        raise ValueError(
            "sampling='cyclic_poisson' takes its number of partitions from noise=BandMF(bands=b) "
            "(an example joins at most one step in any b consecutive ones); pass noise=, or use "
            "sampling='poisson' for independent noise")
    if bands > 1 and sampling not in ("cyclic_poisson", "cyclic"):
        raise ValueError(
            f"noise=BandMF(bands={bands}) needs an example's steps at least {bands} apart, which "
            f"sampling={sampling!r} does not keep (" + (
                "a Poisson draw can take an example at consecutive steps" if sampling == "poisson"
                else "a fresh permutation can put an example at the end of one epoch and the "
                "start of the next") + "); use sampling='cyclic_poisson' (b-min-sep Poisson, the "
            "amplified analysis) or 'cyclic'")
    if bands > 1 and adaptive_clipping is not None:
        raise ValueError(
            "adaptive_clipping with noise=BandMF(bands > 1) is refused: the noisy counts add "
            "independent noise to a correlated release, and dpfused has no accounting of the "
            "joint mechanism it could check; use fixed thresholds, or bands=1")
    if max_batch_size is not None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, numbers.Integral) \
                or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1 (truncated Poisson: at most "
                             f"K examples per logical batch), got {max_batch_size!r}")
        if sampling != "poisson":
            raise ValueError(f"max_batch_size (truncated Poisson) applies to sampling='poisson' "
                             f"only; got sampling={sampling!r}")
        if accountant == "rdp":
            raise ValueError(
                "max_batch_size (truncated Poisson) is accounted by dp_accounting's PLD accountant "
                "only: its RDP accountant has no analysis of TruncatedSubsampledGaussianDpEvent; "
                "use PrivacyEngine(accountant='pld')")
    privacy_math.check_clipping_function(clipping_function, stability)
    if clipping_function == "automatic" and adaptive_clipping is not None:
        raise ValueError(
            "adaptive_clipping with clipping_function='automatic' is refused: automatic clipping "
            "scales every example by C / (||g|| + gamma), so the counts of examples left "
            "unclipped that adapt the thresholds mean nothing; use one or the other")
