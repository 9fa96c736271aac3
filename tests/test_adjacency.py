"""What is protected, said exactly (issue 15): zero-out adjacency for cyclic/shuffled batches,
add/remove for Poisson, replace-one anywhere, and the public parameters of sampling."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from dpfused.accounting import calibrate_noise_multiplier

N, BATCH, DIM, CLIP = 12, 3, 5, 0.5


def _data(zero_out=None):
    inputs = torch.randn(N, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(N) % 2
    if zero_out is not None:
        # No bias: a zero input makes that example's gradient zero, every other example untouched.
        inputs[zero_out] = 0.0
    return TensorDataset(inputs, targets)


def _private(*, sampling="cyclic", neighboring=None, dataset=None, lr=0.1, noise=1.0, **kwargs):
    model = nn.Linear(DIM, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linspace(-1, 1, 2 * DIM, dtype=torch.float64).view(2, DIM))
    engine = dpfused.PrivacyEngine(neighboring=neighboring)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=DataLoader(dataset or _data(), batch_size=BATCH), noise_multiplier=noise,
        max_grad_norm=CLIP, sampling=sampling, **kwargs)
    return engine, model, optimizer, loader


def _train(model, optimizer, loader, steps=None):
    released = []
    for x, y in loader:
        optimizer.zero_grad()
        if len(x):
            F.cross_entropy(model(x), y).backward()
        optimizer.step()
        released.append(model.weight.grad.clone())
        if steps is not None and len(released) == steps:
            break
    return released


@pytest.mark.parametrize("sampling, expected", [("poisson", "add_remove"), ("cyclic", "zero_out"),
                                                ("shuffle", "zero_out")])
def test_each_sampling_gets_the_adjacency_its_proof_covers(sampling, expected):
    engine, model, optimizer, loader = _private(sampling=sampling)
    _train(model, optimizer, loader, steps=2)
    assert engine.accountant.neighboring == expected
    report = engine.privacy_report(delta=1e-5)
    assert report.neighboring == expected
    words = {"add_remove": "adding or removing one example",
             "zero_out": "zeroing out one example"}[expected]
    assert any(words in a for a in report.assumptions)
    assert any("dataset size as public" in a for a in report.assumptions)


@pytest.mark.parametrize("sampling", ["cyclic", "shuffle"])
def test_add_remove_with_fixed_size_batches_is_refused_with_the_fix(sampling):
    model = nn.Linear(DIM, 2)
    with pytest.raises(ValueError, match=f"'add_remove' is not proven for sampling='{sampling}'"
                                         ".*neighboring='zero_out'.*'replace_one'.*'poisson'"):
        dpfused.PrivacyEngine(neighboring="add_remove").make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_data(), batch_size=BATCH), noise_multiplier=1.0,
            max_grad_norm=CLIP, sampling=sampling)
    assert "forward" not in model.__dict__  # refused before anything changed
    with pytest.raises(ValueError, match="not proven"):
        calibrate_noise_multiplier(target_epsilon=1.0, delta=1e-5, sampling=sampling, epochs=2,
                                   neighboring="add_remove")


def test_zero_out_and_add_remove_give_the_same_epsilon_and_replace_one_more():
    eps = {}
    for neighboring in ("zero_out", "replace_one"):
        engine, model, optimizer, loader = _private(neighboring=neighboring)
        _train(model, optimizer, loader)
        eps[neighboring] = engine.get_epsilon(1e-5)
    default_engine, model, optimizer, loader = _private()
    _train(model, optimizer, loader)
    assert default_engine.get_epsilon(1e-5) == eps["zero_out"]
    # One cyclic epoch is one Gaussian of sensitivity C: exactly the add/remove number.
    sigma = calibrate_noise_multiplier(target_epsilon=eps["zero_out"], delta=1e-5,
                                       sampling="cyclic", epochs=1)
    assert sigma == pytest.approx(1.0, rel=2e-3)
    assert eps["replace_one"] > eps["zero_out"]


def test_last_iterate_states_its_adjacency_and_shift():
    for neighboring, shift in ((None, "eta*C/b (zero-out)"), ("replace_one", "2*eta*C/b (replace-one)")):
        engine, model, optimizer, loader = _private(neighboring=neighboring)
        _train(model, optimizer, loader)
        report = engine.privacy_report(delta=1e-5, smoothness=1.0)
        assert report.last_iterate_epsilon is not None
        assert any(shift in a for a in report.assumptions), report.assumptions


def test_sample_rate_is_public_validated_and_accounted():
    engine, model, optimizer, loader = _private(sampling="poisson", sample_rate=0.4)
    _train(model, optimizer, loader, steps=3)
    assert loader.sample_rate == 0.4
    assert {e.sampled.sample_rate for e in engine.accountant.entries} == {0.4}
    assert loader.current.expected_size == pytest.approx(0.4 * N)  # B_norm uses the same q
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="sample_rate must be in \\(0, 1\\]"):
            _private(sampling="poisson", sample_rate=bad)
    for bad in (True, "0.1"):
        with pytest.raises(TypeError, match="sample_rate must be in \\(0, 1\\]"):
            _private(sampling="poisson", sample_rate=bad)
    with pytest.raises(ValueError, match="sample_rate applies to sampling='poisson' only"):
        _private(sampling="cyclic", sample_rate=0.25)


def test_zero_out_neighbour_changes_only_its_own_step_by_at_most_c():
    """The claim itself, in float64: with lr = 0 every step sees the same model, so the released
    (noise-free) clipped sums of a dataset and of its zero-out neighbour differ only at the step
    whose batch holds the example, and there by at most C."""
    k = 7  # in the third batch of the fixed order
    _, model, optimizer, loader = _private(lr=0.0, noise=0.0)
    original = _train(model, optimizer, loader)
    _, model, optimizer, loader = _private(lr=0.0, noise=0.0, dataset=_data(zero_out=k))
    neighbour = _train(model, optimizer, loader)
    assert len(original) == len(neighbour) == N // BATCH
    for step, (a, b) in enumerate(zip(original, neighbour)):
        difference = (a - b).norm().item() * BATCH  # undo B_norm: the clipped sums' difference
        if step == k // BATCH:
            assert 0 < difference <= CLIP * (1 + 1e-12)
        else:
            assert difference == 0.0
