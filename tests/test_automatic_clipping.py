"""Automatic clipping (AUTO-S, Bu et al. 2023): c_i = C / (||G_i|| + gamma), in every clipping mode,
against the float64 torch.func oracle (issue 22 item 3)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from dpfused import privacy_math
from dpfused.instrument import detach, instrument
from tests import models
from tests.oracle import expected_for, per_example_grads, snapshot

MODES = ("flat", "per_layer", "per_device")
FAMILIES = ["mlp", "sequence_mlp", "cnn_groupnorm", "padded_embedding", "transformer_encoder",
            "gpt2_tied", "gpt2_lora"]


def _run(name, clipping, *, stability=0.01, reduction="mean", batch=3):
    case = models.FACTORIES[name](batch, seed=0)
    reference = snapshot(case.model)
    grads = per_example_grads(reference, case.example_loss, case.inputs)
    total = torch.cat([g.reshape(batch, -1) for g in grads.values()], 1).norm(dim=1)
    inst = instrument(case.model, clipping=clipping, max_grad_norm=float(total.median()),
                      thresholds=None, loss_reduction=reduction,
                      batch_first="seq_first" not in name, clipping_function="automatic",
                      stability=stability)
    try:
        case.batch_loss(case.model, case.inputs, reduction).backward()
        step = inst.book.close()
        expected, names = expected_for(case.model, inst, grads, clipping_function="automatic",
                                       stability=stability)
        return expected, {names[k]: v for k, v in step.sums.items()}
    finally:
        detach(case.model)


@pytest.mark.parametrize("clipping", MODES)
@pytest.mark.parametrize("name", FAMILIES)
def test_automatic_clipping_matches_the_oracle(name, clipping):
    expected, ours = _run(name, clipping)
    assert set(ours) == set(expected)
    for key, value in expected.items():
        err = (ours[key].double() - value).norm() / value.norm().clamp_min(1e-30)
        assert err < 1e-9, f"{key}: relative error {err:.3g}"


@pytest.mark.parametrize("stability", [1e-3, 1.0])
def test_automatic_clipping_sum_reduction_and_stability(stability):
    expected, ours = _run("mlp", "flat", stability=stability, reduction="sum")
    for key, value in expected.items():
        assert (ours[key].double() - value).norm() / value.norm() < 1e-9


def test_factor_is_c_over_norm_plus_gamma_and_contribution_below_c():
    bounds = torch.tensor([0.0, 1e-3, 1.0, 1e6, 1e30], dtype=torch.float64)
    factors = privacy_math.clip_factors(bounds, 2.0, clipping_function="automatic", stability=0.5)
    assert torch.equal(factors, 2.0 / (bounds + 0.5))
    assert bool(((factors * bounds) < 2.0).all())  # sensitivity C, every example scaled
    standard = privacy_math.clip_factors(bounds, 2.0)
    assert float(standard[0]) == 1.0 and float(factors[0]) == 4.0  # small gradients grow


def _engine_and_loader(**kwargs):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 5, generator=g), torch.randint(0, 2, (40,), generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return dpfused.PrivacyEngine(), model, optimizer, DataLoader(data, batch_size=8), kwargs


def test_make_private_automatic_keeps_the_accounting():
    engine, model, optimizer, loader, _ = _engine_and_loader()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=1.0, clipping_function="automatic")
    for x, y in loader:
        optimizer.zero_grad()
        if len(x):
            F.cross_entropy(model(x), y).backward()
        optimizer.step()
    expected = dpfused.accounting.composed_epsilon(
        poisson={(8 / 40, 1.0): engine.accountant.steps}, epoch_noise=[], delta=1e-5)
    assert engine.get_epsilon(1e-5) == pytest.approx(expected)
    report = engine.privacy_report(1e-5, smoothness=1.0)
    assert report.last_iterate_epsilon is None


def test_last_iterate_refuses_automatic_clipping():
    engine, model, optimizer, loader, _ = _engine_and_loader()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=1.0, clipping_function="automatic", sampling="cyclic")
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    report = engine.privacy_report(1e-5, smoothness=1.0)
    assert report.last_iterate_epsilon is None
    assert "Lipschitz" in report.last_iterate_reason


@pytest.mark.parametrize("kwargs,match", [
    ({"clipping_function": "auto"}, "clipping_function must be one of .*, got 'auto'"),
    ({"clipping_function": "automatic", "stability": 0.0}, "stability must be"),
    ({"clipping_function": "automatic", "stability": math.inf}, "stability must be"),
    ({"clipping_function": "automatic",
      "adaptive_clipping": dpfused.AdaptiveClipping(count_noise_std=1.0)}, "counts"),
])
def test_bad_clipping_function_is_refused_and_changes_nothing(kwargs, match):
    engine, model, optimizer, loader, _ = _engine_and_loader()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                            noise_multiplier=1.0, max_grad_norm=1.0, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # nothing was instrumented: the same model can be made private now
    engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                        noise_multiplier=1.0, max_grad_norm=1.0)


def test_make_private_with_epsilon_takes_automatic_clipping():
    engine, model, optimizer, loader, _ = _engine_and_loader()
    _, optimizer, _ = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, target_epsilon=2.0,
        target_delta=1e-5, steps=10, max_grad_norm=1.0, clipping_function="automatic",
        stability=0.1)
    assert optimizer.instrumentation.book.clipping_function == "automatic"
    assert optimizer.instrumentation.book.stability == 0.1
