"""secure_mode on several processes (gloo, 2 CPU processes): plain module, DDP and FSDP2.

In secure mode every generator is a ChaCha20Generator keyed from the OS, so no seed can make two
ranks agree by accident. What must still hold (docs/design.md §9): every rank draws the SAME
logical batch (rank 0's sampler key is replicated), and the noise is added once: with a plain
module or DDP every rank adds the same noise from the replicated key after the all-reduce, with
FSDP2 each rank noises its own shard. Either way the ranks' parameters stay
equal, and the noise is really there.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from tests.distributed_harness import run_on_ranks

WORLD, STEPS = 2, 3
KINDS = ("plain", "ddp", "fsdp2")


def _dataset():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(48, 6, generator=g, dtype=torch.float64),
                         torch.randint(0, 3, (48,), generator=g))


def _model(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if kind == "fsdp2":
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
    return model


def _train(kind):
    model = _model(kind)
    initial = {n: _full(p).clone() for n, p in model.named_parameters()}
    engine = dpfused.PrivacyEngine(secure_mode=True)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(_dataset(), batch_size=12), noise_multiplier=1.0,
        max_grad_norm=0.5, sampling="poisson", max_physical_batch_size=3)
    sizes = []
    while optimizer.steps_taken < STEPS:
        for x, y in loader:
            optimizer.zero_grad()
            if len(x) or kind == "fsdp2":  # FSDP2 runs every physical batch (padding)
                F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if loader.current.is_last_physical:
                sizes.append(loader.current.logical_size)
            if optimizer.steps_taken == STEPS:
                break
    final = {n: _full(p).clone() for n, p in model.named_parameters()}
    return {"sizes": sizes, "params": final,
            "moved": min((final[n] - initial[n]).abs().max().item() for n in final)}


def _full(p):
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()


def _every_kind(rank):
    return {kind: _train(kind) for kind in KINDS}


@pytest.mark.slow
def test_secure_mode_ranks_share_the_batches_and_add_the_noise_once(tmp_path):
    ranks = run_on_ranks(_every_kind, tmp_path, world=WORLD)
    for kind in KINDS:
        a, b = ranks[0][kind], ranks[1][kind]
        assert a["sizes"] == b["sizes"] and len(a["sizes"]) == STEPS, kind  # one logical batch
        for name, value in a["params"].items():  # the noise was added once: replicas agree
            torch.testing.assert_close(b["params"][name], value, rtol=0, atol=1e-12,
                                       msg=f"{kind} {name}")
        # sigma C / B = 1 * 0.5 / 12 per step: no coordinate stays where it was.
        assert a["moved"] > 0, kind
