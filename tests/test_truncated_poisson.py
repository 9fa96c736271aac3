"""Truncated Poisson sampling (issue 22 item 2): at most K examples a step, accounted with
dp_accounting's TruncatedSubsampledGaussianDpEvent, a public normalizer, what truncation costs."""

import math

import dp_accounting
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from dp_accounting import pld
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from dpfused import privacy_math
from dpfused.accounting import composed_epsilon
from dpfused.sampling import PoissonBatchSampler, make_private_data_loader


def test_never_more_than_k_and_the_plain_draws_until_the_first_cut():
    plain = PoissonBatchSampler(num_samples=200, sample_rate=0.1, steps_per_epoch=300,
                                generator=torch.Generator().manual_seed(4))
    cut = PoissonBatchSampler(num_samples=200, sample_rate=0.1, steps_per_epoch=300,
                              max_batch_size=24, generator=torch.Generator().manual_seed(4))
    fired = 0
    for a, b in zip(plain, cut):
        assert len(b) <= 24 and b == sorted(b) and len(set(b)) == len(b)
        if cut.last_truncated:
            assert len(a) > 24 and set(b) <= set(a) and len(b) == 24
            fired += 1
            break  # the cut drew a permutation: the two streams part here
        assert a == b
    assert fired == 1


def test_the_kept_subset_is_uniform():
    sampler = PoissonBatchSampler(num_samples=10, sample_rate=0.9, steps_per_epoch=4000,
                                  max_batch_size=3, generator=torch.Generator().manual_seed(0))
    counts = np.zeros(10)
    for batch in sampler:
        counts[batch] += 1
    assert counts.sum() == 3 * 4000  # P(Binomial(10, 0.9) <= 3) is ~1e-5: always cut to 3
    assert np.abs(counts / counts.mean() - 1).max() < 0.1


def test_expected_truncated_size_is_e_min_binomial_k():
    n, q, k = 300, 0.05, 14
    exact = privacy_math.truncated_expected_batch_size(num_samples=n, sample_rate=q,
                                                       max_batch_size=k)
    draws = np.minimum(np.random.default_rng(0).binomial(n, q, size=400_000), k)
    assert exact == pytest.approx(draws.mean(), rel=2e-3)
    assert exact < q * n
    assert privacy_math.truncated_expected_batch_size(
        num_samples=n, sample_rate=q, max_batch_size=n) == pytest.approx(q * n, rel=1e-12)
    assert privacy_math.truncation_probability(num_samples=n, sample_rate=q, max_batch_size=k) \
        == pytest.approx((draws == k).mean() - (np.random.default_rng(0).binomial(n, q, 400_000)
                                                 == k).mean(), abs=5e-3)


def test_lockstep_needs_no_padding_beyond_k():
    """FSDP2's lockstep splits by the largest share of the logical batch, which is at most K."""
    data = DataLoader(TensorDataset(torch.arange(400.0)), batch_size=60)
    physical = []
    for rank in range(2):
        loader = make_private_data_loader(data, max_batch_size=20, max_physical_batch_size=4,
                                          rank=rank, world_size=2, lockstep=True,
                                          generator=torch.Generator().manual_seed(1))
        counts, current = [], 0
        for _ in loader:
            current += 1
            if loader.current.is_last_physical:
                assert loader.current.logical_size <= 20
                counts.append(current)
                current = 0
        physical.append(counts)
        assert loader.truncated_batches > 0  # q N = 60 > 20: every batch is cut
    assert physical[0] == physical[1] and max(physical[0]) <= math.ceil(math.ceil(20 / 2) / 4)


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 5, generator=g, dtype=torch.float64),
                         torch.randint(0, 3, (n,), generator=g))


def _private(*, sigma=1.0, k=6, accountant="pld", reduction="mean", **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    engine = dpfused.PrivacyEngine(accountant=accountant)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(), batch_size=6), noise_multiplier=sigma, max_grad_norm=1.0,
        max_batch_size=k, loss_reduction=reduction,
        sampling_generator=torch.Generator().manual_seed(1),
        noise_generator=torch.Generator().manual_seed(2), **kwargs)
    return engine, model, optimizer, loader


def _train(model, optimizer, loader, reduction="mean", steps=None):
    taken = 0
    for x, y in loader:
        optimizer.zero_grad()
        if len(x):
            F.cross_entropy(model(x), y, reduction=reduction).backward()
        optimizer.step()
        taken += 1
        if taken == steps:
            break
    return taken


def _reference_epsilon(n, q, k, sigma, steps, delta=1e-5):
    """max over the dataset sizes N and N + 1 (add/remove), composed by dp_accounting."""
    values = []
    for size in (n, n + 1):
        accountant = pld.PLDAccountant()
        accountant.compose(dp_accounting.TruncatedSubsampledGaussianDpEvent(
            dataset_size=size, sampling_probability=q, truncated_batch_size=k,
            noise_multiplier=sigma), steps)
        values.append(accountant.get_epsilon(delta))
    return max(values)


def test_epsilon_is_dp_accountings_truncated_event_and_normalizer_is_public():
    engine, model, optimizer, loader = _private(sigma=1.5, k=6)
    steps = _train(model, optimizer, loader)
    assert engine.get_epsilon(1e-5) == pytest.approx(
        _reference_epsilon(48, 6 / 48, 6, 1.5, steps), rel=1e-6)
    assert loader.current.expected_size == pytest.approx(
        privacy_math.truncated_expected_batch_size(num_samples=48, sample_rate=6 / 48,
                                                   max_batch_size=6))
    report = engine.privacy_report(1e-5)
    assert report.max_batch_size == 6 and "truncated to 6" in str(report)
    assert loader.truncated_batches >= 0


def test_mean_loss_is_divided_by_the_expected_truncated_size():
    grads = {}
    for reduction in ("mean", "sum"):
        _, model, optimizer, loader = _private(sigma=0.0, k=4, reduction=reduction)
        _train(model, optimizer, loader, reduction=reduction, steps=1)
        grads[reduction] = model[0].weight.grad.clone()
    expected = privacy_math.truncated_expected_batch_size(num_samples=48, sample_rate=6 / 48,
                                                          max_batch_size=4)
    assert torch.allclose(grads["mean"] * expected, grads["sum"], rtol=1e-12, atol=0)


def test_truncation_costs_epsilon_against_plain_poisson_and_vanishes_for_large_k():
    n, q, sigma, steps = 48, 6 / 48, 1.5, 20
    plain = composed_epsilon(poisson={(q, sigma): steps}, epoch_noise=[], delta=1e-5)
    costs = [composed_epsilon(poisson={}, epoch_noise=[], delta=1e-5,
                              truncated={(n, q, k, sigma): steps}) for k in (6, 9, 48)]
    assert costs[0] > costs[1] > plain
    assert costs[2] == pytest.approx(plain, rel=1e-6)  # K = N never cuts (at N; N+1 almost)


def test_budget_stops_at_the_exact_step():
    budget = 1.0
    engine, model, optimizer, loader = _private(sigma=3.0, k=9, max_epsilon=budget, delta=1e-5)
    with pytest.raises(dpfused.PrivacyBudgetExhausted):
        for _ in range(10):
            _train(model, optimizer, loader)
    taken = engine.accountant.steps
    assert taken > 3
    assert _reference_epsilon(48, 6 / 48, 9, 3.0, taken) <= budget
    assert _reference_epsilon(48, 6 / 48, 9, 3.0, taken + 1) > budget


def test_make_private_with_epsilon_calibrates_truncated_poisson():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).double()
    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(), batch_size=6), target_epsilon=1.0, target_delta=1e-5,
        steps=8, max_grad_norm=1.0, max_batch_size=8)
    _train(model, optimizer, loader)
    assert 0.97 * 1.0 <= engine.get_epsilon(1e-5) <= 1.0


@pytest.mark.parametrize("kwargs,match", [
    ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1"),
    ({"max_batch_size": 2.5}, "max_batch_size must be an integer >= 1"),
    ({"max_batch_size": 5, "sampling": "cyclic"}, "applies to sampling='poisson' only"),
    ({"max_batch_size": 5, "accountant": "rdp"}, "PLD accountant only"),
])
def test_bad_max_batch_size_is_refused_and_changes_nothing(kwargs, match):
    accountant = kwargs.pop("accountant", "pld")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).double()
    before = [p.detach().clone() for p in model.parameters()]
    engine = dpfused.PrivacyEngine(accountant=accountant)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        engine.make_private(module=model, optimizer=optimizer,
                            data_loader=DataLoader(_data(), batch_size=6), noise_multiplier=1.0,
                            max_grad_norm=1.0, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    engine.make_private(module=model, optimizer=optimizer,
                        data_loader=DataLoader(_data(), batch_size=6), noise_multiplier=1.0,
                        max_grad_norm=1.0)


def test_rdp_has_no_truncated_analysis():
    with pytest.raises(ValueError, match="PLD accountant only"):
        composed_epsilon(poisson={}, epoch_noise=[], delta=1e-5, mechanism="rdp",
                         truncated={(48, 0.1, 5, 1.0): 3})
    with pytest.raises(ValueError, match="PLD accountant only"):
        dpfused.accounting.calibrate_noise_multiplier(
            target_epsilon=1.0, delta=1e-5, sampling="poisson", sample_rate=0.1, num_samples=48,
            steps=3, mechanism="rdp", max_batch_size=5)
