"""Per-layer rules: how each layer type runs its forward and hands over per-example gradients.

A rule replaces a module's forward with one whose backward computes the input gradient as usual and,
instead of the batch-summed parameter gradient, delivers *pieces* (``dpfused.pieces``): compact
per-example gradients. Norms (``piece.norm_sq()``) and clipped gradients (``piece.weighted_sum``)
are pure functions of pieces, so a parameter shared between layers of different types (a tied
embedding and LM head) is clipped on the norm of its summed per-example gradient. Each rule module
says at its top which piece forms it hands over and which ``dpfused.kernels`` functions they reach.

Rules are registered for a layer type with ``@register(nn.Linear)`` (subclasses match too) or, for
classes of optional packages, by qualified name. ``rule_for(module)`` walks the class's MRO. Every
rule module is imported below, explicitly: the registry is complete once this package is imported.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch.nn as nn

__all__ = ["BaseRule", "LayerRule", "register", "rule_for", "Tap"]


class Tap(Protocol):
    """What a rule's forward and backward talk to (implemented by ``dpfused.bookkeeper``)."""

    batch_first: bool
    forward_batch: int | None  # batch size seen by earlier layers of this forward

    def record_forward(self, batch: int | None = None) -> None: ...

    def deliver(self, pieces: list) -> None: ...


class LayerRule(Protocol):
    """A layer rule. ``forward`` runs the module; its backward delivers pieces to ``tap``."""

    name: str
    # True when the rule also handles parameters of child modules that the layer uses directly
    # (nn.MultiheadAttention calls out_proj's weight without calling out_proj).
    claims_children: bool

    def check(self, module: nn.Module, path: str) -> None: ...

    def forward(self, module: nn.Module, tap: Tap, *args: Any, **kwargs: Any) -> Any: ...


class BaseRule:
    """Defaults for a rule: no extra checks, owns only its module's own parameters."""

    name = "base"
    claims_children = False

    def check(self, module: nn.Module, path: str) -> None:
        """Raise ValueError naming ``path`` if the module's configuration cannot be made private."""


_BY_TYPE: dict[type, LayerRule] = {}
_BY_NAME: dict[str, LayerRule] = {}


def register(*targets: type | str) -> Callable[[type], type]:
    """Class decorator: register an instance of the rule class for layer types or qualified names."""

    def wrap(rule_cls: type) -> type:
        rule = rule_cls()
        for target in targets:
            if isinstance(target, str):
                _BY_NAME[target] = rule
            else:
                _BY_TYPE[target] = rule
        return rule_cls

    return wrap


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule for ``module``'s class or its nearest registered base class; None if none."""
    for cls in type(module).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls]
        qualified = f"{cls.__module__}.{cls.__qualname__}"
        if qualified in _BY_NAME:
            return _BY_NAME[qualified]
        if cls.__name__ in _BY_NAME:
            return _BY_NAME[cls.__name__]
    return None


def fallback_rule() -> LayerRule:
    """The torch.func rule for modules that own parameters and have no dedicated rule."""
    return _FALLBACK


def container_rule() -> LayerRule:
    """The rule for a module without a dedicated rule that owns trainable parameters directly and
    has descendants with trainable parameters (``dpfused.rules.container``)."""
    return _CONTAINER


from dpfused.rules import (  # noqa: E402,F401
    container, conv, embedding, functorch, linear, mha, norms, recurrent,
)

_FALLBACK = functorch.FunctorchRule()
_CONTAINER = container.ContainerRule()
