"""secure_mode=True end to end: the engine draws noise and batches from ChaCha20 (issue 13 item 2)."""

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpfused
import dpfused.opacus
from dpfused.secure_random import ChaCha20Generator
from tests import models

WIDTH = 120


def _secure(sampling="cyclic", noise=1.3, clip=0.7, batch=8):
    model = models.zero_gradient_model(WIDTH)
    inputs = torch.randn(32, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(inputs), batch_size=batch)
    engine = dpfused.PrivacyEngine(secure_mode=True)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=data,
        noise_multiplier=noise, max_grad_norm=clip, sampling=sampling)
    return engine, model, optimizer, loader


def test_noise_and_batches_come_from_chacha20_with_std_sigma_c_over_b():
    sigma, clip, batch = 1.3, 0.7, 8
    _, model, optimizer, loader = _secure(noise=sigma, clip=clip, batch=batch)
    assert isinstance(optimizer.generator, ChaCha20Generator)
    assert isinstance(loader.batch_sampler.generator, ChaCha20Generator)
    (x,) = next(iter(loader))
    optimizer.zero_grad()
    model(x).sum().backward()
    optimizer.step()
    grad = model.lin.weight.grad.flatten()
    expected = sigma * clip / batch
    # 14400 coordinates: the sample std is within 3% of the truth with overwhelming probability.
    assert abs(grad.std().item() / expected - 1) < 0.03
    assert abs(grad.mean().item()) < 4 * expected / math.sqrt(grad.numel())


@pytest.mark.parametrize("sampling", ["poisson", "shuffle"])
def test_secure_batches_resume_exactly_from_a_checkpoint(sampling):
    engine, model, optimizer, loader = _secure(sampling=sampling)
    batches = iter(loader)
    next(batches)
    state = engine.state_dict()
    expected = [x.clone() for (x,) in batches]
    resumed_engine, _, _, resumed_loader = _secure(sampling=sampling)
    resumed_engine.load_state_dict(state)
    resumed = [x for (x,) in resumed_loader]
    assert len(resumed) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(resumed, expected))


def test_two_secure_runs_draw_different_batches():
    _, _, _, a = _secure(sampling="shuffle")
    _, _, _, b = _secure(sampling="shuffle")
    first = [x for (x,) in a]
    second = [x for (x,) in b]
    assert not all(torch.equal(p, q) for p, q in zip(first, second))


def test_secure_mode_refuses_seeded_generators():
    model = models.zero_gradient_model(WIDTH)
    data = DataLoader(TensorDataset(torch.randn(8, WIDTH, dtype=torch.float64)), batch_size=4)
    with pytest.raises(ValueError, match="secure_mode=True draws the noise .* drop noise_generator"):
        dpfused.PrivacyEngine(secure_mode=True).make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=data,
            noise_multiplier=1.0, max_grad_norm=1.0, noise_generator=torch.Generator())
    assert "forward" not in model.lin.__dict__  # nothing was instrumented


def test_opacus_secure_mode_is_an_engine_argument():
    engine = dpfused.opacus.PrivacyEngine(secure_mode=True)
    assert engine.secure_mode
