"""Fallback for any other module that owns trainable parameters: per-example gradients via torch.func.

Also the rule of nn.GroupNorm and nn.InstanceNorm1d/2d/3d. Pieces: every trainable parameter ->
``DensePiece`` (norm_path "dense"). Kernels reached: none (the dense piece's norms and sums are
plain torch arithmetic).

Correct for every module that treats examples independently, fast for none: the backward re-runs
the module's forward inside ``vmap(vjp)`` over single examples. Positional tensor arguments whose
first dimension is the batch are split per example, except parameters; everything else is passed
through unchanged.
The module must not draw random numbers (dropout) in its own forward: the re-run would draw again.
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn
from torch.func import functional_call, vjp, vmap

from dpfused.pieces import DensePiece
from dpfused.rules import BaseRule, register

_BYPASS = threading.local()


def bypassing() -> bool:
    """True while the fallback re-runs a module: instrumented forwards must run the original."""
    return getattr(_BYPASS, "depth", 0) > 0


class _Bypass:
    def __enter__(self):
        _BYPASS.depth = getattr(_BYPASS, "depth", 0) + 1

    def __exit__(self, *exc):
        _BYPASS.depth -= 1


class _FunctorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call, *tensors):
        ctx.call = call
        ctx.save_for_backward(*tensors[: call.num_inputs])
        return call.run(call.params_now(), tensors[: call.num_inputs], batched=True)

    @staticmethod
    def backward(ctx, grad_out):
        call = ctx.call
        inputs = ctx.saved_tensors
        params = {name: p.detach() for name, p in call.trainable.items()}
        param_grads, input_grads = call.per_example_vjp(params, inputs, grad_out)
        call.tap.deliver([DensePiece(call.trainable[n], param_grads[n]) for n in call.trainable])
        grads = [g if need else None for g, need in zip(input_grads, ctx.needs_input_grad[1:])]
        return (None, *grads, *([None] * len(call.trainable)))


class _Call:
    """One call of a fallback module: what to vmap over and what to pass through."""

    def __init__(self, module, tap, args, kwargs):
        self.module, self.tap, self.kwargs = module, tap, kwargs
        self.trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.frozen = {n: p for n, p in module.named_parameters() if not p.requires_grad}
        batch = _batch_size(args, tap.batch_first)
        self.slots = [_per_example(a, batch) for a in args]
        self.constants = [None if s else a for s, a in zip(self.slots, args)]
        self.num_inputs = sum(self.slots)

    def params_now(self):
        return dict(self.trainable)

    def run(self, params, inputs, *, batched):
        it = iter(inputs)
        args = [next(it) if slot else const for slot, const in zip(self.slots, self.constants)]
        if not batched:
            args = [a.unsqueeze(0) if slot else a for slot, a in zip(self.slots, args)]
        with _Bypass():
            out = functional_call(self.module, {**params, **self.frozen}, tuple(args), self.kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"dpfused's torch.func rule handles modules that return one tensor; "
                f"{type(self.module).__name__} returned {type(out).__name__}"
            )
        return out if batched else out.squeeze(0)

    def per_example_vjp(self, params, inputs, grad_out):
        def one_example(example_inputs, g):
            wide = tuple(widened(x, params) for x in example_inputs)
            out, pullback = vjp(lambda p, xs: self.run(p, xs, batched=False), params, wide)
            param_grads, input_grads = pullback(g.to(out.dtype))
            return param_grads, tuple(gx.to(x.dtype) for gx, x in zip(input_grads, example_inputs))

        if grad_out.shape[0] == 0:  # vmap cannot map over an empty batch
            return ({n: p.new_zeros(0, *p.shape) for n, p in params.items()},
                    tuple(torch.zeros_like(x) for x in inputs))
        try:
            param_grads, input_grads = vmap(one_example)(tuple(inputs), grad_out)
        except Exception as err:  # name the module: torch.func errors do not
            raise RuntimeError(
                f"dpfused could not compute per-example gradients of a "
                f"{type(self.module).__name__} with torch.func ({err}). The module must treat "
                "examples independently and must not draw random numbers in its own forward; "
                "write a layer rule for it (dpfused.rules.register) or freeze its parameters."
            ) from err
        return param_grads, input_grads


def widened(x: torch.Tensor, params: dict) -> torch.Tensor:
    """``x`` in the widest floating dtype of itself and the parameters. Under autocast a module
    can see float16 inputs next to float32 parameters; re-run outside autocast, some kernels then
    mix dtypes in a way their backward refuses (GroupNorm: "Expected scalar types of X and dY are
    same"). The per-example gradients are then computed in the wider dtype: the same function,
    more precisely; the input gradient goes back in the input's dtype."""
    if not x.is_floating_point():
        return x
    dtype = x.dtype
    for p in params.values():
        if p.is_floating_point():
            dtype = torch.promote_types(dtype, p.dtype)
    return x.to(dtype)


def _per_example(arg, batch) -> bool:
    """Whether a positional argument is split per example: a tensor whose first dimension is the
    batch, except a parameter (shared by every example, whatever its first dimension: a parent
    passing its (B, ...)-shaped parameter to this module when the batch happens to have B
    examples must not hand example i row i of it)."""
    return (isinstance(arg, torch.Tensor) and not isinstance(arg, nn.Parameter) and arg.dim() > 0
            and arg.shape[0] == batch)


def _batch_size(args, batch_first):
    for a in args:
        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) and a.dim() > 0:
            if not batch_first:
                raise ValueError(
                    "the torch.func fallback rule supports batch_first=True only"
                )
            return a.shape[0]
    raise ValueError("the torch.func rule needs at least one batched tensor argument")


@register(nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class FunctorchRule(BaseRule):
    """Also the explicit rule for GroupNorm/InstanceNorm: per-example parameter grads are tiny."""

    name = "functorch"
    claims_children = True

    def check(self, module, path):
        if any(p.requires_grad for c in module.children() for p in c.parameters()):
            owned = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            raise ValueError(
                f"module '{path}' ({type(module).__name__}) owns trainable parameters directly "
                f"({', '.join(owned)}) and also has children with trainable parameters; dpfused "
                "cannot split its per-example gradients. Move the parameters into a leaf module "
                "(e.g. an nn.Embedding for a learned position table) or freeze them."
            )

    def forward(self, module, tap, *args, **kwargs):
        tap.record_forward()
        call = _Call(module, tap, args, kwargs)
        inputs = [a for s, a in zip(call.slots, args) if s]
        return _FunctorchFunction.apply(call, *inputs, *call.trainable.values())
