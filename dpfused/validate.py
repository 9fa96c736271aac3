"""Checks before training starts, and ``fix`` for the layers that mix examples (DESIGN §1, issue 2)."""

from __future__ import annotations

import math

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["check_module", "check_optimizer", "fix"]

_RECURRENT = (nn.RNNBase, nn.RNNCellBase)


def check_module(module: nn.Module) -> None:
    """Raise a ValueError naming the first module that would break per-example privacy."""
    if not module.training:
        raise ValueError(
            "module is in eval mode; call model.train() before make_private (dropout and the "
            "layer rules assume training mode)"
        )
    for path, sub in module.named_modules():
        name = path or "<root>"
        if isinstance(sub, _BatchNorm) and sub.training:
            raise ValueError(
                f"module '{name}' ({type(sub).__name__}) mixes examples in a batch (batch "
                "statistics), so one example changes every other example's gradient; replace it "
                "(dpfused.fix(model) swaps BatchNorm for GroupNorm) or put it in eval mode"
            )
        if isinstance(sub, nn.modules.instancenorm._InstanceNorm) and sub.track_running_stats:
            raise ValueError(
                f"module '{name}' ({type(sub).__name__}) has track_running_stats=True: its running "
                "buffers average over the batch and are released with the model without noise; "
                "construct it with track_running_stats=False"
            )
        if isinstance(sub, _RECURRENT) and any(p.requires_grad for p in sub.parameters()):
            raise ValueError(
                f"module '{name}' ({type(sub).__name__}): recurrent layers have no per-example "
                "gradient rule in dpfused yet; use a Transformer or freeze the layer"
            )


def check_optimizer(optimizer, module: nn.Module) -> None:
    """Every parameter the optimizer updates must belong to the module being made private."""
    owned = {id(p) for p in module.parameters()}
    for group_index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in owned:
                raise ValueError(
                    f"optimizer param_groups[{group_index}] holds a parameter of shape "
                    f"{tuple(p.shape)} that is not in the module; it would be updated without "
                    "clipping or noise. Build the optimizer from module.parameters()"
                )


def fix(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm with a GroupNorm over the same channels (in place; returns the module).

    GroupNorm(gcd(32, C), C) normalizes within one example, so examples stay independent.
    """
    if isinstance(module, _BatchNorm):
        return _group_norm_for(module)
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm):
            setattr(module, name, _group_norm_for(child))
        else:
            fix(child)
    return module


def _group_norm_for(bn: _BatchNorm) -> nn.GroupNorm:
    channels = bn.num_features
    norm = nn.GroupNorm(math.gcd(32, channels), channels, eps=bn.eps, affine=bn.affine)
    if bn.affine and bn.weight is not None:
        norm = norm.to(device=bn.weight.device, dtype=bn.weight.dtype)
    return norm
