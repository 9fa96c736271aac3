"""The independent float64 oracle: per-example gradients from torch.func, one example at a time.

Nothing here uses dpfused's rules or kernels: per-example gradients come from ``vmap(grad(...))``
through ``functional_call`` on an uninstrumented copy of the model (tied weights stay tied), are
clipped per group with thresholds from the test, and summed.
"""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call, grad, vmap


def per_example_grads(model, example_loss, inputs):
    """{param name: (B, *shape)} per-example gradients of ``example_loss(model_output, i)``.

    Args:
        model: an UNINSTRUMENTED module (a deepcopy taken before make_private).
        example_loss: (module, single-example inputs as batch of 1) -> scalar loss of that example.
        inputs: tuple of batched tensors; example i is ``tuple(t[i:i+1] for t in inputs)``.
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b for n, b in model.named_buffers()}

    def loss_one(params, *example):
        batched = tuple(t.unsqueeze(0) for t in example)

        def call(*args, **kwargs):
            return functional_call(model, {**params, **frozen, **buffers}, args, kwargs)

        return example_loss(call, batched)

    return vmap(grad(loss_one), in_dims=(None,) + (0,) * len(inputs), randomness="error")(
        params, *inputs
    )


def clipped_sums(grads, groups, *, threshold_of, clipping_function="standard", stability=0.01):
    """sum_i c_ig G_ig for groups given as lists of parameter names.

    c_ig = min(1, C_g / (||G_ig|| + 1e-6)) ("standard"), or C_g / (||G_ig|| + stability)
    ("automatic": AUTO-S, Bu et al. 2023).
    """
    sums = {}
    for name_list in groups:
        flat = torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in name_list], dim=1)
        norms = flat.norm(dim=1)
        if clipping_function == "automatic":
            factors = threshold_of(name_list) / (norms + stability)
        else:
            factors = (threshold_of(name_list) / (norms + 1e-6)).clamp(max=1.0)
        for n in name_list:
            sums[n] = torch.einsum("b,b...->...", factors, grads[n])
    return sums


def snapshot(model):
    return copy.deepcopy(model)


def expected_for(model, inst, grads, *, clipping_function="standard", stability=0.01):
    """The oracle's clipped sums for ``inst``'s groups and thresholds, keyed by parameter name.

    Returns:
        (expected {name: sum}, names {id(param): name}) — names maps dpfused's sums to the oracle's.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g.params] for g in inst.groups]
    threshold = {tuple(names[id(p)] for p in g.params): g.threshold for g in inst.groups}
    return clipped_sums(grads, groups, threshold_of=lambda ns: threshold[tuple(ns)],
                        clipping_function=clipping_function, stability=stability), names


def assert_sums_close(expected, ours, tolerance=1e-9):
    """dpfused's clipped sums equal the oracle's, parameter by parameter, in relative norm."""
    assert set(ours) == set(expected), f"parameters differ: {set(ours) ^ set(expected)}"
    for name, value in expected.items():
        err = (ours[name].double() - value).norm() / value.norm().clamp_min(1e-30)
        assert err < tolerance, f"{name}: relative error {err:.3g}"
