"""Argument checks shared by the public entry points: one wording for one requirement."""

from __future__ import annotations

import math
import numbers

__all__ = ["check_number", "check_noise_multiplier", "check_max_grad_norm"]


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
