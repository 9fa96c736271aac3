"""Argument checks of the public entry points: one wording for one requirement, each written once.

A check raises before anything is changed, naming the argument, what was found and, where there
is one, the fix: a wrong type raises ``ArgumentTypeError``, a value out of range ``ValueError``.
The frozen values (``BandMF``, ``AdaptiveClipping``, the samplers, ``ChaCha20Generator``...) check
themselves in their constructors with the checks here; ``make_private`` and
``make_private_with_epsilon`` run theirs through ``check_make_private`` and ``check_calibration``.
The kernels keep their own (``dpfused.kernels._checks``: they know nothing of privacy).

This module imports no other dpfused module at its top: the modules whose values it checks import
it, so a check that needs one of their classes imports it where it runs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch

__all__ = [
    "ArgumentTypeError", "check_adaptive", "check_calibration", "check_choice",
    "check_clipping_function", "check_data_loader", "check_delta", "check_flag", "check_generator",
    "check_instance", "check_integer", "check_make_private", "check_map_style_dataset",
    "check_max_batch_size", "check_max_grad_norm", "check_mechanism", "check_module_and_optimizer",
    "check_noise", "check_noise_multiplier", "check_number", "check_partitions_given",
    "check_sample_rate", "check_separation", "check_target_epsilon", "check_thresholds_total",
    "refuse_private_loader", "refuse_truncation_under_rdp",
]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type. A TypeError, and a ValueError too: before the checks were
    written once, several entry points raised ValueError for a wrong type (``bands=2.0``), and
    code that catches that keeps working."""


# ---- one requirement, one wording ----------------------------------------------------------

def _is_real(value) -> bool:
    """A real number: not a bool (an int to Python), a string or a tensor."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _refuse(name, requirement, value, hint, error) -> None:
    found = f"{value!r} ({type(value).__name__})" if error is ArgumentTypeError else repr(value)
    raise error(f"{name} must be {requirement}, got {found}{hint}")


def check_number(name: str, value: Any, requirement: str, holds: Callable[[float], bool], *,
                 hint: str = "") -> float:
    """A real number (not a bool, string or tensor) for which ``holds`` is true; returns it as a
    float.

    Raises:
        ArgumentTypeError: not a real number; ValueError: ``holds(value)`` is false.
    """
    if not _is_real(value):
        _refuse(name, requirement, value, hint, ArgumentTypeError)
    if not holds(float(value)):
        _refuse(name, requirement, value, hint, ValueError)
    return float(value)


def check_integer(name: str, value: Any, *, at_least: int = 1, at_most: int | None = None,
                  hint: str = "") -> int:
    """An integer (a Python or numpy integer, not a bool) in [at_least, at_most]; returns it as an
    int.

    Raises:
        ArgumentTypeError: not an integer; ValueError: out of range.
    """
    requirement = (f"an integer >= {at_least}" if at_most is None
                   else f"an integer in [{at_least}, {at_most}]")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _refuse(name, requirement, value, hint, ArgumentTypeError)
    if value < at_least or (at_most is not None and value > at_most):
        _refuse(name, requirement, value, hint, ValueError)
    return int(value)


def check_flag(name: str, value: Any) -> bool:
    """True or False (not 0, 1 or None).

    Raises:
        ArgumentTypeError: anything else.
    """
    if not isinstance(value, bool):
        _refuse(name, "True or False", value, "", ArgumentTypeError)
    return value


def check_instance(name: str, value: Any, cls: type | tuple[type, ...], what: str) -> None:
    """An instance of ``cls``, described to the user as ``what`` ("a torch DataLoader").

    Raises:
        ArgumentTypeError: anything else, naming its type (not its repr: it may be large).
    """
    if not isinstance(value, cls):
        raise ArgumentTypeError(f"{name} must be {what}, got {type(value).__name__}")


def check_choice(name: str, value: Any, allowed: Sequence, *, hint: str = "") -> Any:
    """One of ``allowed``; returns it.

    Raises:
        ValueError: anything else, listing the choices.
    """
    if value not in allowed:
        _refuse(name, f"one of {tuple(allowed)}", value, hint, ValueError)
    return value


def check_delta(delta: Any, *, name: str = "delta") -> float:
    return check_number(name, delta, "in (0, 1)", lambda v: 0 < v < 1)


def check_noise_multiplier(value: Any) -> float:
    return check_number("noise_multiplier", value, "a finite number >= 0",
                        lambda v: math.isfinite(v) and v >= 0)


def check_max_grad_norm(value: Any, *, hint: str = "") -> float:
    return check_number("max_grad_norm", value, "a finite number > 0",
                        lambda v: math.isfinite(v) and v > 0, hint=hint)


def check_sample_rate(sample_rate: Any, *, sampling: str | None = None) -> float:
    """A Poisson rate q in (0, 1]; given ``sampling``, also one that takes a rate (Poisson or its
    b-min-sep variant)."""
    if sampling is not None and sampling not in ("poisson", "cyclic_poisson"):
        raise ValueError(f"sample_rate applies to sampling='poisson' only (and to its b-min-sep "
                         f"variant 'cyclic_poisson'); got sampling={sampling!r}")
    return check_number("sample_rate", sample_rate, "in (0, 1]", lambda v: 0 < v <= 1)


def check_max_batch_size(max_batch_size: Any, *, sampling: str,
                         accountant: str | None = None) -> None:
    """Truncated Poisson (None: not truncated): K >= 1, with Poisson sampling and, given the
    ``accountant``, the PLD one."""
    if max_batch_size is None:
        return
    check_integer("max_batch_size", max_batch_size,
                  hint=" (truncated Poisson: at most K examples per logical batch)")
    if sampling != "poisson":
        raise ValueError(f"max_batch_size (truncated Poisson) applies to sampling='poisson' "
                         f"only; got sampling={sampling!r}")
    if accountant is not None:
        refuse_truncation_under_rdp(accountant)


def check_partitions_given(partitions: Any, *, sampling: str) -> None:
    """Cyclic Poisson takes its number of partitions b, and no other sampling takes one."""
    if (partitions is None) != (sampling != "cyclic_poisson"):
        raise ValueError("partitions goes with sampling='cyclic_poisson' (the number of "
                         f"partitions b), and only there; got sampling={sampling!r}, "
                         f"partitions={partitions!r}")


def refuse_truncation_under_rdp(accountant: str) -> None:
    """Truncated Poisson steps are accounted by the PLD accountant only."""
    if accountant == "rdp":
        raise ValueError(
            "max_batch_size (truncated Poisson) is accounted by dp_accounting's PLD accountant "
            "only: its RDP accountant has no analysis of TruncatedSubsampledGaussianDpEvent; "
            "use accountant='pld'")


def check_thresholds_total(thresholds: Any, max_grad_norm: Any) -> None:
    """Explicit group thresholds must add up (in quadrature) to max_grad_norm, the sensitivity."""
    from dpfused import privacy_math

    if not isinstance(thresholds, (dict, list, tuple)):
        return
    values = list(thresholds.values() if isinstance(thresholds, dict) else thresholds)
    for value in values:
        if not _is_real(value):
            raise ArgumentTypeError(f"thresholds must hold numbers (C_g > 0 per group), got "
                                    f"{value!r}")
    total = privacy_math.sensitivity(values)
    if not math.isclose(total, float(max_grad_norm), rel_tol=1e-6):
        raise ValueError(f"thresholds give sqrt(sum C_g^2) = {total:.6g} but max_grad_norm="
                         f"{max_grad_norm}; make them agree (max_grad_norm is the sensitivity)")


def check_generator(name: str, generator: Any, *, cpu: bool = False) -> None:
    """None, a torch.Generator (on the CPU where ``cpu``), or a ``ChaCha20Generator`` (which secure
    mode uses and otherwise refuses: ``PrivacyEngine._generators``)."""
    from dpfused.secure_random import ChaCha20Generator

    if generator is None or isinstance(generator, ChaCha20Generator):
        return
    check_instance(name, generator, torch.Generator, "a torch.Generator (or None)")
    if cpu and generator.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU torch.Generator (the sampler draws on the CPU), "
                         f"got one on {generator.device}")


# ---- data -------------------------------------------------------------------------------------

def check_map_style_dataset(dataset: Any, *, name: str) -> None:
    """A dataset DP sampling can draw examples from: map-style (not an IterableDataset), with at
    least one example. ``name`` says whose dataset it is ("data_loader's dataset")."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise ValueError(
            f"{name} is an IterableDataset ({type(dataset).__name__}), which cannot be sampled "
            "per example: DP sampling and its accounting need a map-style dataset (with "
            "__getitem__ and __len__); wrap the data in one")
    if not hasattr(dataset, "__len__"):
        raise ValueError(f"{name} has no __len__: DP sampling needs a map-style dataset (with "
                         "__getitem__ and __len__)")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty; DP sampling needs at least one example")


def refuse_private_loader(data_loader: Any) -> None:
    """The native entry points take the user's torch DataLoader, never a private one again (the
    Opacus wing unwraps one instead: ``dpfused.opacus.privacy_engine``)."""
    from dpfused.sampling import DPDataLoader

    if isinstance(data_loader, DPDataLoader):
        raise TypeError(
            "data_loader is already a private DPDataLoader (returned by make_private); pass the "
            "original torch DataLoader")


def check_data_loader(data_loader: Any) -> None:
    """What the sampler and the accounting need of make_private's loader."""
    from dpfused.hf_accelerate import refuse_prepared_loader

    refuse_prepared_loader(data_loader)
    refuse_private_loader(data_loader)
    check_instance("data_loader", data_loader, torch.utils.data.DataLoader, "a torch DataLoader")
    check_map_style_dataset(data_loader.dataset, name="data_loader's dataset")


def check_module_and_optimizer(module: Any, optimizer: Any) -> None:
    """An nn.Module without layers that mix examples, and a plain torch optimizer over its
    parameters only (``dpfused.validate``)."""
    from dpfused import validate
    from dpfused.optimizer import DPOptimizer

    check_instance("module", module, torch.nn.Module, "an nn.Module")
    check_instance("optimizer", optimizer, torch.optim.Optimizer, "a torch.optim.Optimizer")
    if isinstance(optimizer, DPOptimizer):
        raise ValueError("optimizer is already a DPOptimizer; pass the original optimizer")
    validate.check_module(module)
    validate.check_optimizer(optimizer, module)


# ---- make_private and make_private_with_epsilon -----------------------------------------

def check_make_private(a: Mapping[str, Any], *, accountant: str, neighboring: str | None) -> None:
    """Every check of make_private's arguments ``a`` (by name, as make_private takes them, with
    ``module`` and ``optimizer`` unwrapped from DDP / accelerate) that needs no process group,
    for an engine with ``accountant`` and ``neighboring``. The process-group checks are
    ``dpfused.distributed``'s.

    Raises:
        TypeError / ValueError: the first argument that fails, naming it and the fix.
    """
    from dpfused import accounting, privacy_math
    from dpfused.groups import CLIPPING_MODES
    from dpfused.step import SAMPLINGS

    sampling = a["sampling"]
    check_max_grad_norm(a["max_grad_norm"], hint="; per-group thresholds go in thresholds=")
    check_noise_multiplier(a["noise_multiplier"])
    check_choice("clipping", a["clipping"], CLIPPING_MODES)
    check_choice("loss_reduction", a["loss_reduction"], accounting.records.LOSS_REDUCTIONS)
    check_choice("sampling", sampling, SAMPLINGS)
    check_choice("nonfinite_gradients", a["nonfinite_gradients"], privacy_math.NONFINITE_CHOICES)
    if a["sample_rate"] is not None:
        check_sample_rate(a["sample_rate"], sampling=sampling)
    if a["max_physical_batch_size"] is not None:
        check_integer("max_physical_batch_size", a["max_physical_batch_size"])
    _check_budget(a["max_epsilon"], a["delta"])
    for name in ("batch_first", "shuffle_once", "drop_last"):
        check_flag(name, a[name])
    check_generator("noise_generator", a["noise_generator"])
    check_generator("sampling_generator", a["sampling_generator"], cpu=True)
    check_mechanism(noise=a["noise"], sampling=sampling, max_batch_size=a["max_batch_size"],
                    clipping_function=a["clipping_function"], stability=a["stability"],
                    adaptive_clipping=a["adaptive_clipping"], accountant=accountant)
    check_thresholds_total(a["thresholds"], a["max_grad_norm"])
    accounting.check_neighboring(neighboring, sampling)
    check_module_and_optimizer(a["module"], a["optimizer"])
    check_data_loader(a["data_loader"])
    check_separation(a["noise"], a["data_loader"], sampling=sampling,
                     sample_rate=a["sample_rate"], drop_last=a["drop_last"])
    check_adaptive(a["adaptive_clipping"], a["clipping"])


def _check_budget(max_epsilon, delta) -> None:
    if (max_epsilon is None) != (delta is None):
        raise ValueError("max_epsilon and delta go together: give both or neither")
    if max_epsilon is not None:
        check_number("max_epsilon", max_epsilon, "> 0", lambda v: v > 0)
        check_delta(delta)


def check_target_epsilon(target_epsilon: Any, *, name: str = "target_epsilon") -> float:
    return check_number(name, target_epsilon, "a finite number > 0",
                        lambda v: math.isfinite(v) and v > 0)


def check_calibration(*, target_epsilon, target_delta, epochs, steps, last_iterate) -> None:
    """make_private_with_epsilon's own arguments (the rest are make_private's)."""
    check_target_epsilon(target_epsilon)
    check_delta(target_delta, name="target_delta")
    for name, value in (("epochs", epochs), ("steps", steps)):
        if value is not None:
            check_integer(name, value, hint=" (or None)")
    if epochs is None and steps is None:
        raise ValueError("make_private_with_epsilon needs epochs or steps: the length of training "
                         "the target epsilon is spent over")
    if last_iterate is not None:
        _check_last_iterate_plan(last_iterate)


def _check_last_iterate_plan(last_iterate) -> None:
    check_instance("last_iterate", last_iterate, Mapping,
                   "a dict with smoothness (and optionally weight_decay, convex)")
    unknown = sorted(set(last_iterate) - {"smoothness", "weight_decay", "convex"})
    if unknown:
        raise ValueError(f"last_iterate: unknown keys {unknown}; it takes smoothness, "
                         "weight_decay and convex (the learning rate is read from the optimizer)")
    if last_iterate.get("smoothness") is not None:
        check_number("last_iterate['smoothness']", last_iterate["smoothness"],
                     "a finite number > 0", lambda v: math.isfinite(v) and v > 0)
    if "weight_decay" in last_iterate:
        check_number("last_iterate['weight_decay']", last_iterate["weight_decay"],
                     "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
    check_flag("last_iterate['convex']", last_iterate.get("convex", False))


def check_mechanism(*, noise, sampling, max_batch_size, clipping_function, stability,
                    adaptive_clipping, accountant) -> None:
    """The choices of issue 22 and how they combine: BandMF noise, truncated Poisson sampling,
    automatic clipping (docs/design.md §4, §5.1, §6). Checked before anything is changed.

    Raises:
        TypeError / ValueError: naming the argument, what was found and the fix.
    """
    check_noise(noise)
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
    check_max_batch_size(max_batch_size, sampling=sampling, accountant=accountant)
    check_clipping_function(clipping_function, stability)
    if clipping_function == "automatic" and adaptive_clipping is not None:
        raise ValueError(
            "adaptive_clipping with clipping_function='automatic' is refused: automatic clipping "
            "scales every example by C / (||g|| + gamma), so the counts of examples left "
            "unclipped that adapt the thresholds mean nothing; use one or the other")


def check_clipping_function(clipping_function, stability) -> None:
    """One of ``privacy_math.CLIPPING_FUNCTIONS``, and a finite gamma > 0 for automatic clipping."""
    from dpfused.privacy_math import CLIPPING_FUNCTIONS

    check_choice("clipping_function", clipping_function, CLIPPING_FUNCTIONS,
                 hint=" ('standard': min(1, C / ||g||); 'automatic': C / (||g|| + stability), "
                 "AUTO-S of Bu et al. 2023)")
    check_number("stability", stability, "a finite number > 0 (gamma of automatic clipping)",
                 lambda v: math.isfinite(v) and v > 0)


def check_noise(noise) -> None:
    """None (independent Gaussian noise) or a ``BandMF``."""
    from dpfused.bandmf import BandMF

    if noise is not None:
        check_instance("noise", noise, BandMF,
                       "a dpfused.BandMF (or None for independent Gaussian noise)")


def check_adaptive(adaptive_clipping, clipping) -> None:
    """None or an ``AdaptiveClipping`` whose bounds fit ``clipping``."""
    from dpfused.adaptive import AdaptiveClipping

    if adaptive_clipping is None:
        return
    check_instance("adaptive_clipping", adaptive_clipping, AdaptiveClipping,
                   "a dpfused.AdaptiveClipping (or None)")
    adaptive_clipping.check_clipping(clipping)


def check_separation(noise, data_loader, *, sampling, sample_rate, drop_last) -> None:
    """BandMF needs an example's steps at least ``bands`` apart: check that the sampler keeps
    them so, before anything is changed (docs/design.md §5.1, §6).

    Raises:
        ValueError: cyclic batches with fewer batches per epoch than bands, or a cyclic Poisson
            sampler that cannot honour the partitions (q b > 1, b > N).
    """
    from dpfused.sampling import samplers

    if (noise is None or noise.bands == 1
            or not isinstance(data_loader, torch.utils.data.DataLoader)):
        return
    n = len(data_loader.dataset)
    if sampling == "cyclic":
        if data_loader.batch_size is None:
            return  # make_private_data_loader refuses it with its own message
        per_epoch = samplers.batches_per_epoch(sampling="cyclic", num_samples=n,
                                               batch_size=data_loader.batch_size,
                                               drop_last=drop_last)
        if per_epoch < noise.bands:
            raise ValueError(
                f"noise=BandMF(bands={noise.bands}) with sampling='cyclic': an epoch has "
                f"{per_epoch} batches, so an example's steps are {per_epoch} apart, fewer than "
                f"the {noise.bands} bands the noise correlates; use at most {per_epoch} bands, a "
                "smaller batch size, or sampling='cyclic_poisson'")
    elif sampling == "cyclic_poisson":
        q = sample_rate
        if q is None:
            if data_loader.batch_size is None:
                return
            q = samplers.poisson_rate_of_batch_size(data_loader.batch_size, n)
        samplers.check_partitions(num_samples=n, sample_rate=q, partitions=noise.bands)
