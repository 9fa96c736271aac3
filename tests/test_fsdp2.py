"""FSDP2-sharded models (fully_shard; gloo, 2 CPU processes, float64), docs/design.md §9.

Noise 0: after two steps every rank's shards put together are the parameters of ONE process that
clipped the whole logical batch with the torch.func oracle. Noise: with zero gradients each rank's
shard carries N(0, (sigma C / B)^2) per coordinate, from a stream of its own. One spawn per model.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from tests.test_ddp import BATCH, CLIP, LR, STEPS, WORLD, _case, _group_names, _oracle, \
    assert_same_update

CONFIGS = [  # (clipping, max_physical_batch_size, activation checkpointing)
    ("flat", None, False),
    ("per_layer", 2, False),
    ("per_layer", None, True),
]
SIGMA = 4.0


def _blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def _sharded(name, checkpointing):
    case = _case(name)
    model = case.model
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for block in _blocks(model):
        fully_shard(block)
    fully_shard(model)
    return case, model


def _train(name, clipping, physical, checkpointing, noise=0.0, zero_loss=False):
    case, model = _sharded(name, checkpointing)
    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        data_loader=DataLoader(TensorDataset(*case.inputs), batch_size=BATCH),
        noise_multiplier=noise, max_grad_norm=CLIP, clipping=clipping, sampling="cyclic",
        max_physical_batch_size=physical, noise_generator=torch.Generator().manual_seed(3))
    steps = 1 if zero_loss else STEPS
    while optimizer.steps_taken < steps:
        for batch in loader:
            optimizer.zero_grad()
            loss = case.batch_loss(model, batch)
            (loss * 0 if zero_loss else loss).backward()
            optimizer.step()
    if zero_loss:  # this rank's shards of the noised gradient
        return {n: p.grad.to_local().clone() for n, p in model.named_parameters()}
    return {"params": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
            "groups": _group_names(model, optimizer.instrumentation.groups),
            "epsilon": engine.get_epsilon(1e-5)}


def _worker(rank, init_file, folder, name):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        results = [_train(name, *config) for config in CONFIGS]
        noise = _train(name, "flat", None, False, noise=SIGMA, zero_loss=True)
        torch.save({"results": results, "noise": noise}, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_fsdp2_two_ranks_equal_one_process_oracle_and_noise_each_shard_once(tmp_path, name):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), name), nprocs=WORLD,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    initial = dict(_case(name).model.named_parameters())
    for i, config in enumerate(CONFIGS):
        expected = _oracle(name, ranks[0]["results"][i]["groups"])
        for ours in ranks:
            assert_same_update(initial, ours["results"][i]["params"], expected, name, config)
        assert ranks[0]["results"][i]["epsilon"] == ranks[1]["results"][i]["epsilon"]
    # Noise: zero gradients, so each rank's shard is N(0, (sigma C / B)^2) alone.
    shards = [torch.cat([g.flatten() for g in r["noise"].values()]) for r in ranks]
    for shard in shards:
        assert shard.numel() > 800
        assert abs(shard.std().item() / (SIGMA * CLIP / BATCH) - 1) < 0.1
        assert abs(shard.mean().item()) < 4 * SIGMA * CLIP / BATCH / shard.numel() ** 0.5
    n = min(s.numel() for s in shards)
    corr = torch.corrcoef(torch.stack([shards[0][:n], shards[1][:n]]))[0, 1]
    assert abs(corr) < 4 / n ** 0.5  # the ranks' streams are not the same stream
