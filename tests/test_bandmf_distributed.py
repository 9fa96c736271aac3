"""BandMF on more than one process (gloo, 2 CPU processes; docs/design.md §5.1, §9).

- DDP: every rank adds the same correlated noise (the replicated generator), and it is the noise
  one process draws with the same seed, bit for bit.
- FSDP2: each rank keeps the history of its own shard only; per coordinate the shard's noise over
  T steps has covariance sigma^2 C^2 (M^-1)(M^-1)^T, and the ranks' streams are independent.
- FSDP2 distributed checkpoint: each rank's history is saved with its noise stream; a run resumed
  after 3 steps ends where the uninterrupted 6-step run ends.
"""

import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from dpfused.bandmf import BandMF, strategy_matrix
from tests import models
from tests.distributed_harness import run_on_ranks

WORLD, BANDS, SIGMA, CLIP, STEPS = 2, 3, 1.3, 0.7, 6


def _zero_gradient_loader(width):
    return DataLoader(TensorDataset(torch.zeros(40, width, dtype=torch.float64)), batch_size=4)


def _ddp_noise(width=60):
    """Released gradients of a zero-gradient model under DDP (the noise alone), STEPS steps."""
    torch.manual_seed(0)
    model = models.zero_gradient_model(width)
    if dist.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model)
    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=_zero_gradient_loader(width), noise_multiplier=SIGMA, max_grad_norm=CLIP,
        loss_reduction="sum", sampling="cyclic_poisson", noise=BandMF(bands=BANDS),
        noise_generator=torch.Generator().manual_seed(1),
        sampling_generator=torch.Generator().manual_seed(2))
    released = []
    inner = model.module if hasattr(model, "module") else model
    while len(released) < STEPS:
        for (x,) in loader:
            optimizer.zero_grad()
            if len(x):
                model(x).sum().backward()
            optimizer.step()
            released.append(inner.lin.weight.grad.detach().flatten().clone())
            if len(released) == STEPS:
                break
    return torch.stack(released)


def _fsdp_case():
    case = models.llama(8)
    for block in case.model.model.layers:
        fully_shard(block)
    fully_shard(case.model)
    return case


def _fsdp_run(case, *, lr, zero_loss, steps, start=None, path=None):
    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=case.model, optimizer=torch.optim.SGD(case.model.parameters(), lr=lr),
        data_loader=DataLoader(TensorDataset(*case.inputs), batch_size=2),
        noise_multiplier=SIGMA, max_grad_norm=CLIP, sampling="cyclic_poisson",
        noise=BandMF(bands=BANDS), noise_generator=torch.Generator().manual_seed(3),
        sampling_generator=torch.Generator().manual_seed(5))
    if start is not None:
        engine.load_distributed_checkpoint(path=start, module=model, optimizer=optimizer)
    released = []
    while len(released) < steps:
        for batch in loader:
            optimizer.zero_grad()
            loss = case.batch_loss(model, batch)
            (loss * 0 if zero_loss else loss).backward()
            optimizer.step()
            released.append(torch.cat([p.grad.to_local().flatten() for p in model.parameters()
                                       if p.requires_grad]).clone())
            if len(released) == steps:
                break
    if path is not None:
        engine.save_distributed_checkpoint(path=path, module=model, optimizer=optimizer)
    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    return torch.stack(released), full, optimizer.noise_history.nbytes, engine.get_epsilon(1e-5)


def _every_run(rank, folder):
    out = {"ddp": _ddp_noise()}
    noise, _, nbytes, _ = _fsdp_run(_fsdp_case(), lr=0.0, zero_loss=True, steps=STEPS)
    out["fsdp_noise"], out["fsdp_history_bytes"] = noise, nbytes
    _, out["uninterrupted"], _, out["epsilon"] = _fsdp_run(_fsdp_case(), lr=0.5,
                                                          zero_loss=False, steps=6)
    path = os.path.join(folder, "dcp")
    _fsdp_run(_fsdp_case(), lr=0.5, zero_loss=False, steps=3, path=path)
    _, out["resumed"], _, out["resumed_epsilon"] = _fsdp_run(
        _fsdp_case(), lr=0.5, zero_loss=False, steps=3, start=path)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bandmf")
    return run_on_ranks(_every_run, folder, str(folder), world=WORLD)


@pytest.mark.slow
def test_ddp_adds_the_same_correlated_noise_on_every_rank_as_one_process(ranks):
    assert torch.equal(ranks[0]["ddp"], ranks[1]["ddp"])
    assert torch.equal(ranks[0]["ddp"], _ddp_noise())


@pytest.mark.slow
def test_fsdp2_each_rank_correlates_its_own_shard(ranks):
    inverse = torch.linalg.inv(strategy_matrix(BandMF(bands=BANDS).coefficients, STEPS))
    expected = (SIGMA * CLIP / 2) ** 2 * inverse @ inverse.T  # mean loss over the expected batch 2
    shards = [r["fsdp_noise"] for r in ranks]  # (T, this rank's coordinates)
    for rank, shard in zip(ranks, shards):
        d = shard.shape[1]
        assert d > 800
        assert rank["fsdp_history_bytes"] == (BANDS - 1) * d * 8  # its shard only (float64)
        empirical = shard @ shard.T / d
        var = expected.diagonal()
        error = ((var[:, None] * var[None, :] + expected**2) / d).sqrt()
        assert bool(((empirical - expected).abs() <= 5 * error).all())
    n = min(s.shape[1] for s in shards)
    corr = torch.corrcoef(torch.stack([shards[0][0, :n], shards[1][0, :n]]))[0, 1]
    assert abs(corr) < 4 / n**0.5  # independent streams


@pytest.mark.slow
def test_fsdp2_distributed_checkpoint_resumes_the_history(ranks):
    for rank in ranks:
        assert rank["resumed_epsilon"] == rank["epsilon"]
        for name, value in rank["uninterrupted"].items():
            torch.testing.assert_close(rank["resumed"][name], value, rtol=0, atol=0, msg=name)
