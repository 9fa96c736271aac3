"""Opacus' ``FSDP2Wrapper`` (``opacus.utils.fsdp_utils``): shard a model as dpfused's FSDP2 path
takes it (docs/design.md §9)."""

from __future__ import annotations

import torch
import torch.nn as nn

from dpfused.rules import rule_for

__all__ = ["FSDP2Wrapper"]


def FSDP2Wrapper(model: nn.Module, **kwargs) -> nn.Module:  # noqa: N802 (Opacus' name)
    """Opacus' ``FSDP2Wrapper``: shard ``model`` with torch's ``fully_shard``, layer by layer,
    then the root, the way dpfused's FSDP2 path takes it (docs/design.md §9).

    As Opacus' wrapper, every submodule that owns parameters and that dpfused has a layer rule
    for (or whose parameters are all frozen) becomes its own FSDP unit, and the root holds the
    rest. Two exceptions keep each parameter with the module that uses it: the children of a
    rule that uses them directly (``nn.MultiheadAttention``'s ``out_proj``) stay in their
    parent's unit, and a parameter shared by several modules (tied embedding and LM head) stays
    in the root's.

    Args:
        model: the model, unsharded; ``torch.distributed`` initialized.
        **kwargs: Opacus' ``mp_policy`` (a ``MixedPrecisionPolicy``; None: the default) and
            ``opacus_high_precision_layers`` (layer classes whose parameters stay in the default
            dtype).

    Returns:
        The model (``fully_shard`` changes it in place), an FSDP2 module.

    Raises:
        TypeError: an unknown keyword.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = kwargs.pop("mp_policy", None) or MixedPrecisionPolicy()
    high_precision = kwargs.pop("opacus_high_precision_layers", None) or ()
    high_precision = (high_precision,) if isinstance(high_precision, type) else tuple(high_precision)
    if kwargs:
        raise TypeError(f"FSDP2Wrapper got unexpected keyword argument(s) {sorted(kwargs)}; it "
                        "takes Opacus' mp_policy and opacus_high_precision_layers")
    for unit in _shard_units(model):
        policy = mp_policy
        if high_precision and isinstance(unit, high_precision):
            policy = MixedPrecisionPolicy(param_dtype=torch.get_default_dtype())
        fully_shard(unit, mp_policy=policy)
    return fully_shard(model, mp_policy=mp_policy)


def _shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules ``FSDP2Wrapper`` shards before the root (see there), every unit after the
    units inside it (``fully_shard`` takes the parameters no inner unit has taken)."""
    owners: dict[int, int] = {}  # id(param) -> how many modules register it
    for sub in model.modules():
        for p in sub.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    units, inside_claiming = [], set()
    for sub in model.modules():  # parents before children
        if sub is model or id(sub) in inside_claiming:
            continue
        rule = rule_for(sub)
        if rule is not None and rule.claims_children:
            inside_claiming.update(id(m) for m in sub.modules() if m is not sub)
        own = list(sub.parameters(recurse=False))
        if not own or any(owners[id(p)] > 1 for p in own):
            continue
        if rule is not None or not any(p.requires_grad for p in own):
            units.append(sub)
    return units[::-1]
