"""Opacus' ``ModuleValidator`` (``opacus.validators``) over dpfused's checks and ``dpfused.fix``."""

from __future__ import annotations

import copy

import torch.nn as nn

from dpfused.validate import UnsupportedModuleError, fix, module_problems

__all__ = ["ModuleValidator"]


class ModuleValidator:
    """Opacus' ``ModuleValidator`` over dpfused's checks, so Opacus code runs unchanged."""

    @staticmethod
    def validate(module: nn.Module, *, strict: bool = False) -> list[UnsupportedModuleError]:
        """The problems of ``module`` as errors; with ``strict=True`` raise them all at once.

        Raises:
            UnsupportedModuleError: ``strict`` and at least one problem.
        """
        problems = module_problems(module)
        if strict and problems:
            raise UnsupportedModuleError(problems)
        return [UnsupportedModuleError([p]) for p in problems]

    @staticmethod
    def is_valid(module: nn.Module) -> bool:
        return not module_problems(module)

    @staticmethod
    def fix(module: nn.Module, **kwargs) -> nn.Module:
        """A fixed deep copy of ``module``, as Opacus' ``ModuleValidator.fix``; ``module`` is left
        as it was (``fix_in_place`` / ``dpfused.fix`` change it in place). Opacus' options for
        other replacements are refused by name."""
        _refuse_fix_options(kwargs)
        return fix(copy.deepcopy(module))

    @staticmethod
    def fix_in_place(module: nn.Module) -> nn.Module:
        """``dpfused.fix``: the same replacements, made in ``module`` itself; returns it."""
        return fix(module)

    @classmethod
    def fix_and_validate(cls, module: nn.Module, **kwargs) -> nn.Module:
        """``fix`` (a copy), then ``validate(strict=True)`` on it.

        Raises:
            UnsupportedModuleError: what ``fix`` cannot repair (e.g. an LSTM with proj_size).
        """
        fixed = cls.fix(module, **kwargs)
        cls.validate(fixed, strict=True)
        return fixed


def _refuse_fix_options(kwargs):
    if kwargs:
        raise TypeError(f"ModuleValidator.fix: dpfused's fix takes no options; got "
                        f"{sorted(kwargs)} (BatchNorm always becomes GroupNorm, "
                        "nn.LSTM/GRU/RNN always become dpfused.layers.DPLSTM/DPGRU/DPRNN)")
