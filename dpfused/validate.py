"""Checks at make_private and at every forward of a private model, and ``fix`` for the layers that
mix examples (docs/design.md §2.1)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.utils.hooks import RemovableHandle

from dpfused.layers.recurrent import dp_equivalent
from dpfused.rules.recurrent import torch_recurrent_problem

__all__ = ["UnsupportedModuleError", "check_module", "check_optimizer", "fix", "guard_forwards",
           "module_problems"]

_RECURRENT = (nn.RNNBase, nn.RNNCellBase)
# The module types whose refusal can depend on their mode or flags at call time.
_MIXING_CANDIDATES = (_BatchNorm, _InstanceNorm, *_RECURRENT)


class UnsupportedModuleError(ValueError):
    """A module that dpfused cannot make private as it stands; ``errors`` lists every problem."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


def check_module(module: nn.Module) -> None:
    """Raise ``UnsupportedModuleError`` (a ValueError) naming every module that would break
    per-example privacy, each with its fix, as Opacus' ``make_private`` does.

    The module may be in eval mode (``from_pretrained`` returns one): what must hold is that no
    module mixes examples during a private forward, and ``guard_forwards`` checks that at every
    forward, after whatever ``train()`` / ``eval()`` calls came in between.
    """
    problems = module_problems(module, training=True)
    if problems:
        raise UnsupportedModuleError(problems)


def module_problems(module: nn.Module, *, training: bool = False) -> list[str]:
    """Every submodule that would break per-example privacy, one message each (with the fix).

    Args:
        module: the model.
        training: judge BatchNorm by its current mode (a BatchNorm in eval mode with running
            statistics uses fixed statistics and is fine); False judges the model as it will
            train, every BatchNorm in train mode.
    """
    problems = []
    for path, sub in module.named_modules():
        problem = _problem(path or "<root>", sub, as_trained=not training, grad_enabled=True)
        if problem is not None:
            problems.append(problem)
    return problems


def guard_forwards(module: nn.Module) -> list[RemovableHandle]:
    """Refuse, at every forward of ``module``'s submodules that could mix examples, the ones that
    now do; returns the hooks' handles (``dpfused.detach`` removes them).

    ``model.train()`` after make_private puts a BatchNorm that was in eval mode back on batch
    statistics; the check at make_private cannot see that. A forward pre-hook on each BatchNorm,
    InstanceNorm and recurrent layer (only those: the rest of the model pays nothing) applies the
    make_private check at each call, before the module runs: nothing it would compute or update
    exists yet when it refuses. With grad enabled every problem is refused; without grad only a
    module in training mode whose running statistics the call would update (BatchNorm, or an
    InstanceNorm tracking them): they are released with the model without noise.

    Raises (from the hook):
        UnsupportedModuleError: the module mixes examples in this call; the message names it,
            what it does and the fix.
    """
    handles = []
    for path, sub in module.named_modules():
        if isinstance(sub, _MIXING_CANDIDATES):
            handles.append(sub.register_forward_pre_hook(_refuse_if_mixing(path or "<root>")))
    return handles


def _refuse_if_mixing(path: str):
    def refuse(sub, _args):
        problem = _problem(path, sub, as_trained=False, grad_enabled=torch.is_grad_enabled(),
                           at_forward=True)
        if problem is not None:
            raise UnsupportedModuleError([f"dpfused refused a forward of the private model: "
                                          f"{problem}"])

    return refuse


def _problem(name: str, sub: nn.Module, *, as_trained: bool, grad_enabled: bool,
             at_forward: bool = False) -> str | None:
    """What ``sub`` breaks, or None. ``as_trained`` judges a BatchNorm as if in training mode;
    otherwise it is judged as it would run now, with or without grad. ``at_forward``: judged
    at a forward of the private model (``guard_forwards``), not at make_private."""
    if isinstance(sub, _BatchNorm):
        return _batchnorm_problem(name, sub, as_trained=as_trained, grad_enabled=grad_enabled)
    if (isinstance(sub, _InstanceNorm) and sub.track_running_stats
            and (grad_enabled or sub.training)):
        return (
            f"module '{name}' ({type(sub).__name__}) has track_running_stats=True: its running "
            "buffers average over the batch and are released with the model without noise; "
            "construct it with track_running_stats=False (dpfused.fix(model) does)"
        )
    if (isinstance(sub, _RECURRENT) and grad_enabled
            and any(p.requires_grad for p in sub.parameters())):
        return _recurrent_problem(name, sub, at_forward=at_forward)
    return None


def _batchnorm_problem(name, bn, *, as_trained, grad_enabled):
    # torch's rule (_BatchNorm.forward): batch statistics in training mode, and also in eval mode
    # when there are no running buffers; the buffers are updated only in training mode.
    training = as_trained or bn.training
    has_buffers = bn.running_mean is not None
    kind = type(bn).__name__
    if training and (grad_enabled or has_buffers):
        updates = (" and updates running_mean/running_var from the batch, which are released "
                   "with the model without noise" if has_buffers else "")
        return (
            f"module '{name}' ({kind}) mixes examples in a batch: in training mode it normalizes "
            f"with the batch's statistics, so one example changes every other example's "
            f"gradient{updates}. Replace it (dpfused.fix(model) swaps BatchNorm for GroupNorm), "
            "or put it in eval mode (fixed statistics) and back in eval mode after every "
            f"model.train(), which puts it in training mode (model.get_submodule('{name}').eval())"
        )
    if not has_buffers and grad_enabled:
        return (
            f"module '{name}' ({kind}) mixes examples in a batch: it has no running statistics "
            "(track_running_stats=False), so even in eval mode it normalizes with the batch's "
            "statistics and one example changes every other example's gradient. Replace it "
            "(dpfused.fix(model) swaps BatchNorm for GroupNorm)"
        )
    return None


def _recurrent_problem(name: str, module: nn.Module, *, at_forward: bool) -> str | None:
    kind = type(module).__name__
    if isinstance(module, (nn.LSTM, nn.GRU, nn.RNN)):
        # dpfused's recurrent rule runs torch's own modules (dpfused/rules/recurrent.py).
        problem = torch_recurrent_problem(module, name)
        if problem is not None or not at_forward or _runs_dpfused_rule(module):
            return problem
        return (
            f"module '{name}' ({kind}) has trainable parameters but was frozen at make_private, "
            "so it runs torch's fused recurrence and its gradients would not be clipped; freeze "
            "it again, or unfreeze it before make_private (dpfused clips it as it is)"
        )
    return (
        f"module '{name}' ({kind}) is a recurrent layer with no per-example gradient rule in "
        "dpfused; build the model from dpfused.layers.DPLSTM / DPGRU / DPRNN (whole sequences, "
        "same arguments as nn.LSTM / nn.GRU / nn.RNN) or freeze the layer"
    )


def _runs_dpfused_rule(module: nn.Module) -> bool:
    """make_private put its rule's forward on this instance (``instrument._Patch``)."""
    return hasattr(module.__dict__.get("forward"), "_dpfused_original")


def _swappable_recurrent(module: nn.Module) -> bool:
    """Exactly nn.LSTM / nn.GRU / nn.RNN (a subclass may change forward), without proj_size."""
    return type(module) in (nn.LSTM, nn.GRU, nn.RNN) and not getattr(module, "proj_size", 0)


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
    """Make the fixable problems go away, in place; returns the module.

    Every BatchNorm becomes a GroupNorm over the same channels (GroupNorm(gcd(32, C), C)
    normalizes within one example, so examples stay independent), every InstanceNorm stops
    tracking running statistics (it then uses each example's own, as in training), and every
    nn.LSTM / nn.GRU / nn.RNN becomes dpfused.layers.DPLSTM / DPGRU / DPRNN with the same
    configuration and weights (same outputs). Subclasses of those and LSTMs with proj_size are
    left alone (``module_problems`` still reports them).
    """
    if isinstance(module, _BatchNorm):
        return _group_norm_for(module)
    if _swappable_recurrent(module):
        return dp_equivalent(module)
    for sub in module.modules():
        if isinstance(sub, _InstanceNorm) and sub.track_running_stats:
            sub.track_running_stats = False
            sub.running_mean = sub.running_var = sub.num_batches_tracked = None
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm):
            setattr(module, name, _group_norm_for(child))
        elif _swappable_recurrent(child):
            setattr(module, name, dp_equivalent(child))
        else:
            fix(child)
    return module


def _group_norm_for(bn: _BatchNorm) -> nn.GroupNorm:
    channels = bn.num_features
    norm = nn.GroupNorm(math.gcd(32, channels), channels, eps=bn.eps, affine=bn.affine)
    if bn.affine and bn.weight is not None:
        norm = norm.to(device=bn.weight.device, dtype=bn.weight.dtype)
    return norm
