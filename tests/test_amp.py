"""float16 with loss scaling: dpfused.amp.GradScaler (issue 23 item 1; docs/design.md §3).

- In float64 (no autocast) a scaled loss gives exactly the step of the unscaled one: clip factors
  and sums are in unscaled units.
- Under float16 autocast the step matches the float64 torch.func oracle to float16 accuracy, on
  GPT-2 and Llama tiny.
- An example whose scaled gradient overflows is dropped on its own (nonfinite_gradients="drop"),
  never the step; the dynamic scale moves only from a noised, accounted count.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from dpfused.amp import GradScaler
from tests import models
from tests.oracle import per_example_grads, snapshot

C = 0.5


def _private(case, *, clipping="flat", nonfinite="drop", loss_reduction="mean", seed=0):
    model = copy.deepcopy(case.model)
    batch = len(case.inputs[0])
    loader = DataLoader(TensorDataset(*case.inputs), batch_size=batch)
    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=C, sampling="cyclic", clipping=clipping,
        loss_reduction=loss_reduction, nonfinite_gradients=nonfinite,
        noise_generator=torch.Generator().manual_seed(seed))
    return engine, model, optimizer, loader


def _step_grads(case, *, scale=None, autocast=None, clipping="flat", loss_reduction="mean"):
    """The released gradient of one logical batch holding every example (sigma = 0)."""
    _, model, optimizer, loader = _private(case, clipping=clipping, loss_reduction=loss_reduction)
    scaler = GradScaler(optimizer, init_scale=scale) if scale is not None else None
    for batch in loader:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = case.batch_loss(model, batch, loss_reduction)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    return {n: p.grad.double().clone() for n, p in model.named_parameters() if p.requires_grad}


def _oracle(case, *, loss_reduction="mean"):
    """Flat clipping at C of float64 per-example gradients, normalized like the release."""
    grads = per_example_grads(snapshot(case.model), case.example_loss, case.inputs)
    batch = len(case.inputs[0])
    norms = torch.cat([g.reshape(batch, -1) for g in grads.values()], 1).norm(dim=1)
    factors = (C / (norms + 1e-6)).clamp(max=1.0)
    normalizer = batch if loss_reduction == "mean" else 1
    return {n: torch.einsum("b,b...->...", factors, g) / normalizer for n, g in grads.items()}


def _relative_error(ours, expected):
    num = sum((ours[n] - expected[n]).pow(2).sum() for n in expected).sqrt()
    den = sum(expected[n].pow(2).sum() for n in expected).sqrt()
    return float(num / den)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_a_static_scale_changes_nothing_in_float64(clipping, loss_reduction):
    case = models.gpt2(4)
    plain = _step_grads(case, clipping=clipping, loss_reduction=loss_reduction)
    scaled = _step_grads(case, scale=2.0 ** 10, clipping=clipping, loss_reduction=loss_reduction)
    for name in plain:
        torch.testing.assert_close(scaled[name], plain[name], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("factory", ["gpt2", "llama"])
def test_float16_autocast_matches_the_float64_oracle(factory):
    case = getattr(models, factory)(4)
    expected = _oracle(case)
    case32 = copy.copy(case)
    case32.model = copy.deepcopy(case.model).float()
    ours = _step_grads(case32, scale=2.0 ** 8, autocast=torch.float16)
    assert _relative_error(ours, expected) < 5e-2  # float16 forward and backward: ~1e-2 relative


def test_an_overflowing_example_is_dropped_alone():
    """An example whose scaled gradient overflows float16 contributes 0; the others are exact."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x, y = torch.randn(4, 4), torch.randn(4, 3)
    x[2] *= 3e3  # its scaled gradient overflows float16 (max 65504) at s = 2^8

    def loss_fn(model, xb, yb):
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(xb)
        return ((out.float() - yb) ** 2).sum(dim=1).mean()

    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=layer, optimizer=torch.optim.SGD(layer.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=4), noise_multiplier=0.0,
        max_grad_norm=1e6, sampling="cyclic", nonfinite_gradients="drop")
    scaler = GradScaler(optimizer, init_scale=2.0 ** 8)
    xb, yb = next(iter(loader))
    optimizer.zero_grad()
    with pytest.warns(RuntimeWarning, match="dropped"):
        scaler.scale(loss_fn(model, xb, yb)).backward()
    scaler.step(optimizer)
    assert optimizer.examples_dropped == 1 and engine.accountant.steps == 1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_dynamic_scale_moves_only_on_the_noised_count_and_is_accounted():
    case = models.mlp(8)
    engine, model, optimizer, loader = _private(case, nonfinite="drop")
    plain_sigma = optimizer.accounted_noise_multiplier
    optimizer.noise_multiplier = 2.0
    scaler = GradScaler(optimizer, init_scale=2.0 ** 4, dynamic=True, overflow_noise_std=4.0,
                        growth_interval=2)
    assert optimizer.accounted_noise_multiplier == pytest.approx((2.0 ** -2 + 4.0 ** -2) ** -0.5)
    assert plain_sigma == 0.0
    scales = []
    for _ in range(4):
        for batch in loader:
            optimizer.zero_grad()
            scaler.scale(case.batch_loss(model, batch, "mean")).backward()
            scaler.step(optimizer)
            scaler.update()
            scales.append(scaler.get_scale())
    assert all(math.isfinite(s) and s > 0 for s in scales)
    # No example overflows here: the noised count (std 4, 8 examples) rarely exceeds 1% of 8.
    assert engine.accountant.steps == 4


def test_torch_grad_scaler_is_refused_and_names_dpfused_amp():
    case = models.mlp(4)
    _, model, optimizer, loader = _private(case)
    scaler = torch.amp.GradScaler("cpu")
    batch = next(iter(loader))
    optimizer.zero_grad()
    scaler.scale(case.batch_loss(model, batch, "mean")).backward()
    with pytest.raises(ValueError, match="dpfused.amp.GradScaler"):
        scaler.step(optimizer)


def test_bad_scaler_arguments_are_refused():
    case = models.mlp(4)
    _, _, optimizer, _ = _private(case, nonfinite="raise")
    with pytest.raises(ValueError, match="overflow_noise_std"):
        GradScaler(optimizer, dynamic=True)
    with pytest.raises(ValueError, match="nonfinite_gradients='drop'"):
        GradScaler(optimizer, dynamic=True, overflow_noise_std=1.0)
    with pytest.raises(TypeError, match="DPOptimizer"):
        GradScaler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    with pytest.raises(ValueError, match="init_scale"):
        GradScaler(optimizer, init_scale=0.0)
    assert optimizer.joint_noise_multipliers == ()  # nothing half-applied


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_groupnorm_and_container_rules_under_autocast(dtype):
    """The torch.func and container rules re-run a forward in backward: under autocast that re-run
    must see the same casts (GroupNorm runs in float32 there), or it failed on mixed dtypes."""
    case = models.cnn(4)  # Conv2d -> GroupNorm -> ...
    case32 = copy.copy(case)
    case32.model = copy.deepcopy(case.model).float()
    case32.inputs = tuple(t.float() if t.is_floating_point() else t for t in case.inputs)
    expected = _oracle(case)
    scale = 2.0 ** 8 if dtype == torch.float16 else None
    ours = _step_grads(case32, scale=scale, autocast=dtype)
    assert _relative_error(ours, expected) < 5e-2
