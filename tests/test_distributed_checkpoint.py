"""Sharded checkpoints (torch.distributed.checkpoint) of an FSDP2 DP run, docs/design.md §9.

2-rank gloo, float64, Llama tiny sharded with fully_shard, Adam (its state must come back too),
shuffled batches across an epoch boundary. A run trains K steps, saves, trains M more; a fresh run
(other seeds, perturbed initial weights: only the checkpoint can make it agree) loads the
checkpoint and trains M steps. It gets the same batches, the same parameters and the same epsilon,
with noise 0 and with noise (the per-rank noise streams are saved and restored).
"""

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from tests.distributed_harness import process_group, run_on_ranks
from tests import models

WORLD, N, BATCH, K, M, CLIP, SIGMA = 2, 12, 4, 2, 2, 0.1, 0.8


def _run(folder, noise, *, resume, seed):
    case = models.llama(N)
    model = case.model
    if resume:  # a different start: only the checkpoint can bring it back
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.25)
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
        data_loader=DataLoader(TensorDataset(*case.inputs), batch_size=BATCH),
        noise_multiplier=noise, max_grad_norm=CLIP, clipping="per_layer", sampling="shuffle",
        sampling_generator=torch.Generator().manual_seed(seed),
        noise_generator=torch.Generator().manual_seed(seed + 1))
    path = os.path.join(folder, f"checkpoint-{noise}")
    if resume:
        engine.load_distributed_checkpoint(path=path, module=model, optimizer=optimizer)
    batches = []
    while optimizer.steps_taken < K + M:
        for batch in loader:
            batches.append(batch[0].clone())
            optimizer.zero_grad()
            case.batch_loss(model, batch).backward()
            optimizer.step()
            if optimizer.steps_taken == K and not resume:
                engine.save_distributed_checkpoint(path=path, module=model, optimizer=optimizer)
                batches = []  # compare what comes after the checkpoint
            if optimizer.steps_taken == K + M:
                break
    return {"batches": batches, "epsilon": engine.get_epsilon(1e-5),
            "params": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}}


def _straight_and_resumed(rank, folder):
    return {noise: (_run(folder, noise, resume=False, seed=5),
                    _run(folder, noise, resume=True, seed=50)) for noise in (0.0, SIGMA)}


@pytest.mark.slow
def test_fsdp2_resume_from_a_sharded_checkpoint_is_the_uninterrupted_run(tmp_path):
    ranks = run_on_ranks(_straight_and_resumed, tmp_path, str(tmp_path), world=WORLD)
    for noise in (0.0, SIGMA):
        for r, rank in enumerate(ranks):
            straight, resumed = rank[noise]
            assert len(resumed["batches"]) == len(straight["batches"]) >= M
            for a, b in zip(straight["batches"], resumed["batches"]):
                assert torch.equal(a, b), f"noise {noise}, rank {r}: another batch after resume"
            assert resumed["epsilon"] == straight["epsilon"] > 0
            for name, value in straight["params"].items():
                torch.testing.assert_close(resumed["params"][name], value, rtol=0, atol=1e-12,
                                           msg=f"noise {noise}, rank {r}, {name}")
    # The noised run moved the parameters elsewhere than the noiseless one: noise was restored,
    # not absent.
    name = next(iter(ranks[0][0.0][0]["params"]))
    assert not torch.allclose(ranks[0][0.0][0]["params"][name], ranks[0][SIGMA][0]["params"][name])
    # Another world size cannot take over per-rank noise streams.
    with process_group(tmp_path):
        engine, model, optimizer = _plain_run(steps=0)
        with pytest.raises(ValueError, match="saved by 2 ranks with per-rank noise streams"):
            engine.load_distributed_checkpoint(path=tmp_path / f"checkpoint-{SIGMA}",
                                               module=model, optimizer=optimizer)


def _plain_run(*, steps, secure=False, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(20, 6, generator=g, dtype=torch.float64),
                         torch.randint(0, 3, (20,), generator=g))
    engine = dpfused.PrivacyEngine(secure_mode=secure)
    seeded = {} if secure else {"noise_generator": torch.Generator().manual_seed(seed),
                                "sampling_generator": torch.Generator().manual_seed(seed)}
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        data_loader=DataLoader(data, batch_size=5), noise_multiplier=1.0, max_grad_norm=1.0,
        sampling="poisson", **seeded)
    engine.batches = []
    engine.train = lambda n: _train(model, optimizer, loader, n, engine.batches)
    engine.train(steps)
    return engine, model, optimizer


def _train(model, optimizer, loader, steps, batches):
    target = optimizer.steps_taken + steps
    while optimizer.steps_taken < target:
        for x, y in loader:
            batches.append(x.clone())
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if optimizer.steps_taken == target:
                break


@pytest.mark.parametrize("secure", [False, True])
def test_one_process_resume_and_secure_mode_draws_fresh_noise(tmp_path, secure):
    """Without torch.distributed the same API works (one rank). In secure mode the noise key is
    not saved: the batches and epsilon resume exactly, the noise is fresh."""
    engine, model, optimizer = _plain_run(steps=2, secure=secure)
    engine.save_distributed_checkpoint(path=tmp_path / "ckpt", module=model, optimizer=optimizer)
    saved = {n: p.detach().clone() for n, p in model.state_dict().items()}
    engine.batches.clear()
    engine.train(3)
    resumed, model2, optimizer2 = _plain_run(steps=0, secure=secure, seed=7)
    resumed.load_distributed_checkpoint(path=tmp_path / "ckpt", module=model2,
                                        optimizer=optimizer2)
    for n, p in model2.state_dict().items():
        assert torch.equal(p, saved[n])
    assert optimizer2.original_optimizer.state_dict()["state"]  # momentum buffers came back
    resumed.train(3)
    assert [x.shape for x in resumed.batches] == [x.shape for x in engine.batches]
    assert all(torch.equal(a, b) for a, b in zip(resumed.batches, engine.batches))
    assert resumed.get_epsilon(1e-5) == engine.get_epsilon(1e-5)
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert same != secure  # seeded: the same noise; secure: fresh noise, other parameters
