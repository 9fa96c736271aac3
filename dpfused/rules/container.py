"""Rule for a module that owns trainable parameters directly AND has children that own some.

Opacus' ``ModelWithCustomLinear`` (``x = fc2(fc1(x)); x @ self.extra_param``), HuggingFace's ViT
embeddings (``cls_token`` and ``position_embeddings`` next to a patch convolution): the module's
own parameters (its *direct* parameters) are used in its forward around calls of its children.
Pieces: each direct parameter -> ``DensePiece`` (norm_path "dense"); the children's parameters are
handed over by the children's own rules. Kernels reached: none.

How (docs/design.md §3, the container rule). The forward runs the module's
own code once, with its direct parameters swapped for detached copies: the children run
instrumented (their rules deliver their pieces in backward) and the input gradient flows through
the direct parameters' values, but no batch-summed gradient reaches them. The output then passes
through an identity whose backward takes the output gradient ``g`` and computes each example's
gradient of the direct parameters, ``vjp`` of the module's forward on that example alone at
``g_i``, with every other parameter held constant (``vmap`` over examples, children running their
original code). Both parts are exact when examples are independent, so the direct parameters and
the children's join the same clipping groups as any other layer's.

Refused: a forward that returns something other than one tensor, a ``Dropout`` with p > 0
inside the module (the per-example re-run would draw other masks), and ``batch_first=False``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import vjp, vmap

from dpfused.pieces import DensePiece
from dpfused.rules import BaseRule
from dpfused.rules.functorch import _Call, widened

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
             nn.FeatureAlphaDropout)


class ContainerRule(BaseRule):
    """Direct parameters of a module with trainable children (see the module docstring).

    Chosen by ``dpfused.instrument`` for a module without a registered rule that owns trainable
    parameters directly and has a descendant with trainable parameters.
    """

    name = "container"
    claims_children = False

    def check(self, module, path):
        for name, sub in module.named_modules():
            sub_path = name if path == "<root>" else f"{path}.{name}"
            if isinstance(sub, _DROPOUTS) and sub.p > 0:
                raise ValueError(
                    f"module '{path}' ({type(module).__name__}) owns trainable parameters directly "
                    f"({', '.join(direct_parameters(module))}) and runs '{sub_path}' "
                    f"({type(sub).__name__}, p={sub.p}) in its forward: dpfused computes the "
                    "per-example gradients of those parameters by re-running the forward one "
                    "example at a time, which would draw different dropout masks. Set the dropout "
                    "to p=0, or move the parameters into a leaf module (e.g. an nn.Embedding for "
                    "a learned position table), or freeze them")

    def forward(self, module, tap, *args, **kwargs):
        tap.record_forward()
        call = _DirectCall(module, tap, args, kwargs)
        out = _run_with_detached(module, call.trainable, args, kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"dpfused's container rule handles modules that return one tensor; "
                f"{type(module).__name__} owns trainable parameters directly "
                f"({', '.join(call.trainable)}) and returned {type(out).__name__}. Return one "
                "tensor, or move the parameters into a leaf module, or freeze them")
        inputs = [a for s, a in zip(call.slots, args) if s]
        return _DirectGradients.apply(call, out, *inputs, *call.trainable.values())


def direct_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters ``module`` registers itself and no descendant registers too (a
    parameter a descendant also registers is that descendant's, e.g. Opacus' DPLSTM)."""
    in_descendants = {id(p) for child in module.children() for p in child.parameters()}
    return {n: p for n, p in module.named_parameters(recurse=False)
            if p.requires_grad and id(p) not in in_descendants}


class _DirectCall(_Call):
    """A ``_Call`` differentiating the direct parameters only; the rest are constants."""

    def __init__(self, module, tap, args, kwargs):
        super().__init__(module, tap, args, kwargs)
        self.trainable = direct_parameters(module)
        self.frozen = {n: p.detach() for n, p in module.named_parameters()
                       if n not in self.trainable}

    def per_example_param_grads(self, inputs, grad_out):
        params = {n: p.detach() for n, p in self.trainable.items()}
        if grad_out.shape[0] == 0:  # vmap cannot map over an empty batch
            return {n: p.new_zeros(0, *p.shape) for n, p in params.items()}

        def one_example(example_inputs, g):
            wide = tuple(widened(x, params) for x in example_inputs)
            out, pullback = vjp(lambda p: self.run(p, wide, batched=False), params)
            return pullback(g.to(out.dtype))[0]

        try:
            return vmap(one_example)(tuple(inputs), grad_out)
        except Exception as err:  # name the module: torch.func errors do not
            raise RuntimeError(
                f"dpfused could not compute per-example gradients of the parameters "
                f"{', '.join(self.trainable)} that {type(self.module).__name__} owns directly, "
                f"with torch.func ({err}). Its forward must treat examples independently and must "
                "not draw random numbers (dropout); or move the parameters into a leaf module, "
                "or freeze them.") from err


def _run_with_detached(module, direct, args, kwargs):
    """The module's own forward with its direct parameters swapped for detached copies (still
    ``nn.Parameter``s, so a child given one as an argument treats it as shared, not per example)."""
    patched = module.__dict__.get("forward")
    original = getattr(patched, "_dpfused_original", None) or type(module).forward.__get__(module)
    saved = {n: module._parameters[n] for n in direct}
    try:
        for n, p in saved.items():
            module._parameters[n] = nn.Parameter(p.detach(), requires_grad=False)
        return original(*args, **kwargs)
    finally:
        module._parameters.update(saved)


class _DirectGradients(torch.autograd.Function):
    """Identity on the output; its backward delivers the direct parameters' pieces."""

    @staticmethod
    def forward(ctx, call, out, *tensors):
        ctx.call = call
        ctx.save_for_backward(*tensors[: call.num_inputs])
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        call = ctx.call
        grads = call.per_example_param_grads(ctx.saved_tensors, grad_out)
        call.tap.deliver([DensePiece(p, grads[n]) for n, p in call.trainable.items()])
        return (None, grad_out, *([None] * (len(ctx.needs_input_grad) - 2)))
