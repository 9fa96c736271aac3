"""LayerNorm and RMSNorm (torch and HuggingFace variants): per-example gradients materialized.

Pieces: weight and bias -> ``DensePiece`` (norm_path "dense"). Kernels reached:
``kernels.norm_layer_backward`` (input gradient and per-example weight/bias gradients in one
pass); norms and clipped sums of the dense pieces are plain torch arithmetic.

Their per-example gradients are small vectors (sum_t x_hat_t * g_t and sum_t g_t, docs/design.md §3), so
they are DensePieces; the kernel computes them together with the input gradient in one pass.
nn.GroupNorm goes through the torch.func rule (correct; its parameters are tiny).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpfused import kernels
from dpfused.pieces import DensePiece
from dpfused.rules import BaseRule, register
from dpfused.rules._shape import batch_major

# HuggingFace RMSNorm classes known to compute weight * (x / rms(x)).to(dtype) with no offset.
# Others (Gemma's 1 + weight, ...) fall back to the torch.func rule, which is exact for any form.
HF_RMSNORMS = (
    "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm",
    "MixtralRMSNorm", "SmolLM3RMSNorm", "OlmoRMSNorm", "Olmo2RMSNorm", "GraniteRMSNorm",
)


class _NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, tap, spec):
        ctx.save_for_backward(x)
        ctx.weight, ctx.bias, ctx.tap, ctx.spec = weight, bias, tap, spec
        return _norm_forward(x, weight, bias, spec)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        spec, tap = ctx.spec, ctx.tap
        xb, gb = batch_major(x, tap.batch_first), batch_major(grad_out, tap.batch_first)
        grad_x, weight_grads, bias_grads = _backward(xb, gb, ctx.weight, ctx.bias, spec)
        pieces = []
        if ctx.weight is not None and ctx.weight.requires_grad:
            pieces.append(DensePiece(ctx.weight, weight_grads))
        if ctx.bias is not None and ctx.bias.requires_grad:
            pieces.append(DensePiece(ctx.bias, bias_grads))
        tap.deliver(pieces)
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        grad_x = grad_x if tap.batch_first or x.dim() < 3 else grad_x.movedim(0, 1)
        return grad_x.to(x.dtype), None, None, None, None


def _backward(x, grad_out, weight, bias, spec):
    if x.shape[0] == 0:  # an empty Poisson batch: nothing to normalize, nothing to clip
        empty = x.new_zeros(0, *spec["shape"], dtype=torch.float32)
        return torch.zeros_like(x), empty, empty
    return kernels.norm_layer_backward(
        x, grad_out, weight, normalized_shape=spec["shape"], eps=spec["eps"], rms=spec["rms"],
        has_bias=bias is not None,
    )


def _norm_forward(x, weight, bias, spec):
    if not spec["rms"]:
        return F.layer_norm(x, spec["shape"], weight, bias, spec["eps"])
    dims = tuple(range(-len(spec["shape"]), 0))
    # HuggingFace computes in float32 whatever the input; nn.RMSNorm in float32 at least (bf16 and
    # fp16 upcast, float64 stays float64).
    compute = torch.float32 if spec["hf"] else torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + spec["eps"])
    if spec["hf"]:  # HuggingFace casts before the weight multiply
        return weight * normed.to(x.dtype)
    out = normed if weight is None else normed * weight.to(compute)
    return out.to(x.dtype)


def _apply(module, tap, x, spec):
    tap.record_forward()
    return _NormFunction.apply(x, module.weight, getattr(module, "bias", None), tap, spec)


@register(nn.LayerNorm)
class LayerNormRule(BaseRule):
    name = "layer_norm"
    def forward(self, module, tap, x):
        spec = {"shape": tuple(module.normalized_shape), "eps": module.eps, "rms": False, "hf": False}
        return _apply(module, tap, x, spec)


@register(nn.RMSNorm)
class RMSNormRule(BaseRule):
    name = "rms_norm"
    def forward(self, module, tap, x):
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        spec = {"shape": tuple(module.normalized_shape), "eps": eps, "rms": True, "hf": False}
        return _apply(module, tap, x, spec)


@register(*HF_RMSNORMS)
class HFRMSNormRule(BaseRule):
    name = "rms_norm_hf"
    def check(self, module, path):
        if not isinstance(getattr(module, "weight", None), nn.Parameter) or not hasattr(
            module, "variance_epsilon"
        ):
            raise ValueError(
                f"module '{path}' ({type(module).__name__}) does not look like a HuggingFace RMSNorm "
                "(weight, variance_epsilon); please report it"
            )

    def forward(self, module, tap, x):
        spec = {"shape": (module.weight.shape[-1],), "eps": module.variance_epsilon,
                "rms": True, "hf": True}
        return _apply(module, tap, x, spec)
