"""Instrument a module in place: each layer that owns trainable parameters runs through its rule.

The module object, its parameters and its state_dict keys stay the same; only ``forward`` of each
instrumented submodule is overridden on the instance (``detach`` deletes the override). Forwards
run without grad (evaluation, ``generate``) go straight to the original code.

Code that swaps instance-level forwards after make_private (the ``kernels`` library, which
transformers runs again at every ``train()`` / ``eval()`` of a model loaded with hub kernels)
deletes or replaces the override; a forward pre-hook on the private module puts it back before
every grad-enabled forward (docs/design.md §2.1).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from dpfused.bookkeeper import Bookkeeper
from dpfused.groups import Layer, build_groups
from dpfused.rules import container_rule, fallback_rule, rule_for
from dpfused.rules.functorch import bypassing
from dpfused.validate import guard_forwards

__all__ = ["Instrumentation", "instrument", "plan", "detach", "explain", "instrumentation_of"]

_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, Instrumentation]" = weakref.WeakKeyDictionary()


@dataclass
class Instrumentation:
    """What make_private did to a module: its layers, groups and book-keeping."""

    module: nn.Module
    layers: list[Layer]
    book: Bookkeeper
    clipping: str
    hooks: list = field(default_factory=list)  # removed by detach
    patches: list["_Patch"] = field(default_factory=list)  # one per layer, removed by detach

    @property
    def groups(self):
        return self.book.groups

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for g in self.groups for p in g.params]


def instrument(module, *, clipping, max_grad_norm, thresholds, loss_reduction, batch_first,
               count_unclipped=False, nonfinite="raise", clipping_function="standard",
               stability=0.01):
    """Find the layers, build the clipping groups and patch the forwards. Raises before patching.

    ``clipping_function`` and ``stability``: how norm bounds become clip factors
    (``privacy_math.clip_factors``: "standard" or AUTO-S's "automatic").
    """
    layers, groups = plan(module, clipping=clipping, max_grad_norm=max_grad_norm,
                          thresholds=thresholds)
    book = Bookkeeper(groups, loss_reduction=loss_reduction, batch_first=batch_first,
                      count_unclipped=count_unclipped, nonfinite=nonfinite,
                      clipping_function=clipping_function, stability=stability)
    patches = [_Patch(layer, book.tap(layer)) for layer in layers]
    hooks = [module.register_forward_pre_hook(_restore_patches(patches), prepend=True),
             *_guard_token_mean_losses(module), *guard_forwards(module)]
    inst = Instrumentation(module, layers, book, clipping, hooks, patches)
    _ACTIVE[module] = inst
    return inst


def plan(module, *, clipping, max_grad_norm, thresholds=None):
    """The layers and clipping groups ``instrument`` would build; changes nothing."""
    if module in _ACTIVE:
        raise ValueError(
            "module is already instrumented by dpfused; call dpfused.detach(model) before making "
            "it private again"
        )
    layers = _find_layers(module)
    _check_coverage(module, layers)
    groups = build_groups(layers, clipping=clipping, max_grad_norm=max_grad_norm,
                          thresholds=thresholds)
    return layers, groups


def _find_layers(module):
    layers, claimed = [], set()
    for path, sub in module.named_modules():
        if id(sub) in claimed:
            continue
        rule = rule_for(sub)
        if rule is not None and rule.claims_children:
            params = [p for p in sub.parameters() if p.requires_grad]
            claimed.update(id(m) for m in sub.modules())
        else:
            held = _held_by_ruled_descendants(sub)
            params = [p for p in sub.parameters(recurse=False)
                      if p.requires_grad and id(p) not in held]
        if not params:
            continue
        rule = rule or _unruled_rule(sub)
        rule.check(sub, path or "<root>")
        layers.append(Layer(path or "<root>", sub, rule, params))
    return layers


def _unruled_rule(module):
    """The torch.func fallback for a module without a rule; the container rule when it also has
    descendants with trainable parameters (their own rules clip those; docs/design.md §3)."""
    if any(p.requires_grad for child in module.children() for p in child.parameters()):
        return container_rule()
    return fallback_rule()


def _held_by_ruled_descendants(module):
    """Ids of ``module``'s own parameters that a descendant with a layer rule also registers.

    Such a parameter is a second registration of the same object (Opacus' DPLSTM exposes its
    ``RNNLinear`` children's weights as ``weight_ih_l0`` ...): the descendant's rule handles it, and
    the module is not a second owner of it.
    """
    own = {id(p) for p in module.parameters(recurse=False)}
    if not own:
        return set()
    held = set()
    for sub in module.modules():
        if sub is not module and rule_for(sub) is not None:
            held.update(id(p) for p in sub.parameters(recurse=False) if id(p) in own)
    return held


def _check_coverage(module, layers):
    handled = {id(p) for layer in layers for p in layer.params}
    for name, p in module.named_parameters():
        if p.requires_grad and id(p) not in handled:
            raise ValueError(
                f"parameter '{name}' is trainable but no layer rule handles it; freeze it or "
                "register a rule for its module (dpfused.rules.register)"
            )
    if not handled:
        raise ValueError("module has no trainable parameters; nothing to make private")


class _Patch:
    """dpfused's ``forward`` on one layer's instance: the rule with grad, the module's own code
    without."""

    def __init__(self, layer, tap):
        self.layer, self.tap = layer, tap
        self.install()

    def install(self):
        module, rule, tap = self.layer.module, self.layer.rule, self.tap
        # An instance-level forward already there (a hub kernel, accelerate's device hook) keeps
        # running without grad and is put back by detach; None means the class's forward.
        self.replaced = module.__dict__.get("forward")
        original = module.forward

        def forward(*args, **kwargs):
            if bypassing() or not torch.is_grad_enabled():
                return original(*args, **kwargs)
            return rule.forward(module, tap, *args, **kwargs)

        forward._dpfused_original = self.replaced  # type: ignore[attr-defined]  # rules/container.py
        self.forward = forward
        module.forward = forward

    def stripped(self) -> bool:
        """True when the override was deleted, or replaced by the ``kernels`` library.

        ``kernels.kernelize`` pops the instance attribute ``forward`` to go back to the class's
        code, or sets a hub kernel's forward there (and ``_kernel_repo`` beside it). Both compute
        the layer's own function, which the rule computes too, so re-installing is exact. Any other
        replacement (accelerate wrapping the override, a user's own forward) is left alone: if it
        bypasses the rule, backward fails closed.
        """
        current = self.layer.module.__dict__.get("forward")
        if current is self.forward:
            return False
        return current is None or "_kernel_repo" in self.layer.module.__dict__

    def remove(self):
        module = self.layer.module
        module.__dict__.pop("forward", None)
        if self.replaced is not None:
            module.forward = self.replaced


def _restore_patches(patches):
    """A forward pre-hook for the private module: re-install every stripped override.

    Runs before the module's forward, so its submodules resolve ``forward`` after the repair. The
    module's own override (a private model that is itself one layer) is resolved before the hook
    runs: if that one was stripped, the call is refused and the override re-installed.
    """

    def restore(root, _args):
        if bypassing() or not torch.is_grad_enabled():
            return
        stripped = [patch for patch in patches if patch.stripped()]
        for patch in stripped:
            patch.install()
        if any(patch.layer.module is root for patch in stripped):
            raise RuntimeError(
                f"the forward of the private module ({type(root).__name__}) was replaced after "
                "make_private (e.g. by the kernels library's kernelize, which transformers runs "
                "at model.train() / model.eval()); this call would bypass per-example clipping, "
                "so it was refused and dpfused re-installed its forward: repeat the call"
            )

    return restore


# HuggingFace heads whose built-in loss (``labels=``) averages over every token of the batch.
_TOKEN_LOSS_HEADS = ("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForTokenClassification",
                     "ForConditionalGeneration", "ForPreTraining")


def _guard_token_mean_losses(module):
    """Refuse ``labels=`` on HuggingFace token-level heads while training (docs/design.md §3)."""
    hooks = []
    for path, sub in module.named_modules():
        name = type(sub).__name__
        if not name.endswith(_TOKEN_LOSS_HEADS):
            continue

        def refuse_labels(_module, args, kwargs, path=path or "<root>", name=name):
            if kwargs.get("labels") is not None and torch.is_grad_enabled():
                raise ValueError(
                    f"module '{path}' ({name}) was called with labels=: HuggingFace then averages "
                    "the loss over every token of the batch, so one example's token count rescales "
                    "every other example's gradient and clipping no longer bounds the sensitivity. "
                    "Call it without labels and use dpfused.per_example_lm_loss(outputs.logits, "
                    "labels)"
                )

        hooks.append(sub.register_forward_pre_hook(refuse_labels, with_kwargs=True))
    return hooks


def detach(module: nn.Module) -> nn.Module:
    """Remove dpfused's instrumentation from ``module`` (in place); returns the module.

    Raises:
        ValueError: the module was not made private by dpfused.
    """
    inst = _ACTIVE.pop(module, None)
    if inst is None:
        raise ValueError("module is not instrumented by dpfused (nothing to detach)")
    for hook in inst.hooks:
        hook.remove()
    for patch in inst.patches:
        patch.remove()
    return module


def instrumentation_of(module: nn.Module) -> Instrumentation | None:
    return _ACTIVE.get(module)


def explain(module: nn.Module) -> str:
    """A table of the instrumented layers: rule, clipping group, threshold and norm path taken.

    The path (ghost / direct) is the one the last backward pass chose for the layer's shapes.
    """
    inst = _ACTIVE.get(module)
    if inst is None:
        raise ValueError("module is not instrumented by dpfused; call make_private first")
    group_of = {path: g for g in inst.groups for path in g.layers}
    rows = [("layer", "rule", "group", "C_g", "norm path")]
    for layer in inst.layers:
        group = group_of.get(layer.path)
        rows.append((
            layer.path, layer.rule.name, group.name if group else "-",
            f"{group.threshold:.4g}" if group else "-",
            inst.book.paths.get(layer.path, "-"),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
