"""Data parallel over torch.distributed (gloo, 2 CPU processes): one logical batch split over ranks.

Noise 0: every rank ends with the parameters of a single process that saw the whole batch.
Noise > 0: the noise is added exactly once (std sigma C / B) and every rank holds the same gradient.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from tests.distributed_harness import WORLD, run_on_ranks


def _dataset():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(48, 30, generator=g, dtype=torch.float64),
                         torch.randint(0, 4, (48,), generator=g))


def _train(rank, noise, steps, clipping="flat", adaptive=False):
    torch.manual_seed(100 + rank)  # different inits: make_private must broadcast rank 0's
    model = nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 4)).double()
    if rank == 0:
        torch.manual_seed(100)
        model = nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 4)).double()
    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.2),
        data_loader=DataLoader(_dataset(), batch_size=12), noise_multiplier=noise,
        max_grad_norm=0.3, sampling="poisson", clipping=clipping, max_physical_batch_size=4,
        sampling_generator=torch.Generator().manual_seed(5),
        noise_generator=torch.Generator().manual_seed(9),
        adaptive_clipping=dpfused.AdaptiveClipping(count_noise_std=0.5) if adaptive else None)
    grads = []
    while optimizer.steps_taken < steps:
        for x, y in loader:
            optimizer.zero_grad()
            if len(x):
                F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if loader.current.is_last_physical:
                grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            if optimizer.steps_taken == steps:
                break
    return {"params": [p.detach() for p in model.parameters()], "grads": grads,
            "epsilon": engine.get_epsilon(1e-5),
            "thresholds": [g.threshold for g in optimizer.instrumentation.groups]}


def _accelerate_worker(rank):
    # What `accelerate launch --num_processes 2` sets up: the environment, then Accelerator().
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert dist.is_initialized() and accelerator.num_processes == WORLD
    return _train(rank, 0.0, 3)


def _run_distributed(tmp_path, noise, steps, clipping="flat", adaptive=False):
    return run_on_ranks(_train, tmp_path, noise, steps, clipping, adaptive)


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    ranks = _run_distributed(tmp_path, noise=0.0, steps=3)
    single = _train(0, 0.0, 3)
    for ours in ranks:
        for a, b in zip(ours["params"], single["params"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)  # summation order differs
        assert ours["epsilon"] == single["epsilon"]


@pytest.mark.slow
def test_noise_is_added_once_across_ranks(tmp_path):
    sigma, clip, expected_batch = 2.0, 0.3, 12.0
    ranks = _run_distributed(tmp_path, noise=sigma, steps=2)
    torch.testing.assert_close(ranks[0]["grads"][0], ranks[1]["grads"][0], rtol=0, atol=0)
    # ~1400 coordinates; the clipped signal is at most C / B per step: small next to the noise.
    std = ranks[0]["grads"][0].std().item()
    assert abs(std / (sigma * clip / expected_batch) - 1) < 0.1


@pytest.mark.slow
def test_adaptive_thresholds_agree_across_ranks_and_with_one_process(tmp_path):
    # Counts are all-reduced, then noised once (the same draw on every rank): every rank moves to
    # the same thresholds, the ones a single process on the whole batch reaches with the same
    # noise generator.
    ranks = _run_distributed(tmp_path, noise=0.0, steps=3, clipping="per_layer", adaptive=True)
    single = _train(0, 0.0, 3, clipping="per_layer", adaptive=True)
    assert single["thresholds"] != [0.3 / 2 ** 0.5] * 2  # they moved
    for ours in ranks:
        assert ours["thresholds"] == pytest.approx(single["thresholds"], rel=1e-9)
        for a, b in zip(ours["params"], single["params"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_accelerate_launch_setup_equals_one_process(tmp_path):
    # Under accelerate, make_private takes the unwrapped model and the raw DataLoader (see README).
    ranks = run_on_ranks(_accelerate_worker, tmp_path, rendezvous="environment")
    single = _train(0, 0.0, 3)
    for ours in ranks:
        for a, b in zip(ours["params"], single["params"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_a_loader_prepared_by_accelerate_is_refused_with_the_fix():
    from accelerate import Accelerator

    prepared = Accelerator(cpu=True).prepare(DataLoader(_dataset(), batch_size=12))
    model = nn.Linear(30, 4).double()
    with pytest.raises(TypeError, match="before accelerator.prepare"):
        dpfused.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=prepared, noise_multiplier=1.0, max_grad_norm=1.0)
