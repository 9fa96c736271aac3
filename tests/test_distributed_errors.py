"""Sharded and wrapped models that dpfused cannot make private exactly get a clear error (§9)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from tests.distributed_harness import process_group, run_on_ranks


def _loader(n=16):
    return DataLoader(TensorDataset(torch.randn(n, 4), torch.randint(0, 2, (n,))), batch_size=4)


def _make(model, loader=None, **kwargs):
    return dpfused.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader or _loader(), noise_multiplier=1.0, max_grad_norm=1.0, **kwargs)


@pytest.fixture
def one_rank(tmp_path):
    with process_group(tmp_path):
        yield


def _mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def test_fsdp1_is_refused(one_rank):
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(_mlp(), device_id=torch.device("cpu"),
                                     use_orig_params=True)
    with pytest.raises(ValueError, match=r"FullyShardedDataParallel \(FSDP1\).*fully_shard"):
        _make(model)


def test_tensor_parallel_dtensors_are_refused(one_rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    model = _mlp()
    mesh = init_device_mesh("cpu", (1,))
    parallelize_module(model, mesh, {"0": ColwiseParallel()})
    with pytest.raises(ValueError, match=r"tensor parallelism .* not\)"):
        _make(model)


def test_a_sharded_block_without_a_sharded_root_is_refused(one_rank):
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    fully_shard(model[0])
    with pytest.raises(ValueError, match="apply fully_shard to the root too"):
        _make(model)


def test_per_device_on_a_sharded_model_is_refused_with_the_reason(one_rank):
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(_mlp())
    with pytest.raises(ValueError, match="every FSDP rank holds a shard of every layer"):
        _make(model, clipping="per_device")


def test_fully_shard_after_make_private_is_detected(one_rank):
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    model, optimizer, loader = _make(model)
    fully_shard(model)  # replaces the parameters make_private instrumented
    x, y = next(iter(loader))
    with pytest.raises(ValueError, match="fully_shard applied after it"):
        F.cross_entropy(model(x), y).backward()


class _UsesWeightOutside(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x) + F.linear(x, self.lin.weight)  # the weight outside its module


def test_a_sharded_parameter_used_outside_its_module_is_refused(one_rank):
    from torch.distributed.fsdp import fully_shard

    model, optimizer, loader = _make(fully_shard(_UsesWeightOutside()))
    x, y = next(iter(loader))
    with pytest.raises(ValueError, match="did not come through dpfused.*call the module instead"):
        F.cross_entropy(model(x), y).backward()


def test_sharded_gradients_left_from_the_last_step_are_refused(one_rank):
    from torch.distributed.fsdp import fully_shard

    model, optimizer, loader = _make(fully_shard(_mlp()))
    batches = iter(loader)
    x, y = next(batches)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    before = [p.full_tensor().clone() for p in model.parameters()]
    x, y = next(batches)  # no optimizer.zero_grad(): FSDP would add into the released gradient
    with pytest.raises(ValueError, match="call optimizer.zero_grad"):
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="zero_grad"):
        optimizer.step()
    assert all(torch.equal(a, p.full_tensor()) for a, p in zip(before, model.parameters()))


def _differing_loader_worker(rank):
    with pytest.raises(ValueError, match=r"rank 1's data loader differs .*len\(dataset\): "
                                         r"16 on rank 0, 20 on rank 1"):
        _make(_mlp(), loader=_loader(16 if rank == 0 else 20))
    return "ok"


def test_a_rank_whose_data_loader_differs_is_detected_on_every_rank(tmp_path):
    assert run_on_ranks(_differing_loader_worker, tmp_path, world=2) == ["ok", "ok"]


class _Augmented(torch.utils.data.Dataset):
    """The same 16 examples on every rank, plus a random augmentation drawn from torch's, numpy's
    and Python's global generators (seeded differently per rank): not a difference of data."""

    def __init__(self, shift=0.0):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 4, generator=g) + shift
        self.y = torch.randint(0, 2, (16,), generator=g)

    def __len__(self):
        return 16

    def __getitem__(self, i):
        import random

        import numpy as np

        noise = 0.1 * torch.randn(4) + float(np.random.rand()) + random.random()
        return self.x[i] + noise, self.y[i]


def _same_length_worker(rank):
    import random

    import numpy as np

    torch.manual_seed(rank)
    np.random.seed(rank)
    random.seed(rank)
    _make(_mlp(), loader=DataLoader(_Augmented(), batch_size=4))  # the same data: accepted
    # Each rank its own shard of equal length (what a DistributedSampler-minded user does).
    with pytest.raises(ValueError, match=r"rank 1's data loader differs .*dataset content.*"
                                         r"give every rank the WHOLE dataset"):
        _make(_mlp(), loader=DataLoader(_Augmented(shift=float(rank)), batch_size=4))
    # Items of any kind are fingerprinted: here one string differs.
    records = [{"text": f"example {i}", "ids": torch.arange(3) + i} for i in range(8)]
    if rank == 1:
        records[5] = {"text": "another example", "ids": torch.arange(3) + 5}
    fingerprints = [dpfused.distributed.dataset_fingerprint(records),
                    dpfused.distributed.dataset_fingerprint(records[:5])]
    every = [None, None]
    dist.all_gather_object(every, fingerprints)
    assert every[0][0] != every[1][0]  # record 5 differs
    assert every[0][1] == every[1][1]  # records 0-4 agree
    # The augmentations' generators are seeded for the fingerprint, then restored.
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    dpfused.distributed.dataset_fingerprint(_Augmented())
    assert torch.equal(states[0], torch.get_rng_state())
    assert (states[1] == np.random.get_state()[1]).all() and states[2] == random.getstate()
    return "ok"


def test_ranks_with_different_data_of_the_same_length_are_refused(tmp_path):
    assert run_on_ranks(_same_length_worker, tmp_path, world=2) == ["ok", "ok"]


def test_a_sharded_parameter_used_outside_forward_is_refused(one_rank):
    """A loss term on the sharded parameters (computed where they are sharded, before forward)
    puts an unclipped autograd gradient into the sharded .grad: refused, and not kept."""
    from torch.distributed.fsdp import fully_shard

    model, optimizer, loader = _make(fully_shard(_mlp()))
    x, y = next(iter(loader))
    penalty = sum(p.pow(2).sum().full_tensor() for p in model.parameters())  # sharded here
    with pytest.raises(ValueError, match="did not come through dpfused"):
        (F.cross_entropy(model(x), y) + penalty).backward()
    assert all(p.grad is None for p in model.parameters())
