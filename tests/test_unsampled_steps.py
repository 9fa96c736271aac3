"""Steps on batches the private data loader did not draw (issue 21.8).

Opacus' vision benchmarks (torchbenchmark's ``opacus_cifar10``, Opacus' own benchmark scripts) call
``make_private`` and then time ``optimizer.step()`` on ``torch.randn`` batches, never iterating the
private loader. Such a step runs as Opacus runs it (clipped, noised, divided by the expected batch
size) and is recorded as a step with NO guarantee: every epsilon from then on is infinite, the first
one warns, the report says why and from which step, a budget refuses it, data parallel training
refuses it, and checkpoints holding it load consistently.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from dpfused.accounting import PrivacyAccountant, PrivacyBudgetExhausted, SampledStep
from tests.distributed_harness import process_group
from tests.oracle import clipped_sums, per_example_grads

N, BATCH, CLIP, LR = 64, 16, 0.5, 0.1


def vision_model(seed=0):
    """A small CNN as Opacus' benchmarks build them (GroupNorm: ModuleValidator.fix's BatchNorm)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 10)).double()


def cifar_like_loader():
    data = TensorDataset(torch.randn(N, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (N,)))
    return DataLoader(data, batch_size=BATCH)


def opacus_benchmark(*, poisson_sampling=True, steps=3, batch=12, noise_multiplier=0.0, **kwargs):
    """What the benchmark does: make_private, then timed steps on random tensors."""
    from dpfused.opacus import PrivacyEngine

    model = vision_model()
    initial = copy.deepcopy(model)
    privacy_engine = PrivacyEngine()
    model, optimizer, _ = privacy_engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        data_loader=cifar_like_loader(), noise_multiplier=noise_multiplier, max_grad_norm=CLIP,
        poisson_sampling=poisson_sampling, **kwargs)
    criterion = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 10, (batch,), generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
    return privacy_engine, model, optimizer, initial, (images, labels), caught


def oracle_step(model, images, labels, normalizer):
    """One SGD step on sum_i clip(g_i) / normalizer, per-example gradients from torch.func."""
    def example_loss(call, example):
        x, y = example
        return F.cross_entropy(call(x), y)

    grads = per_example_grads(model, example_loss, (images, labels))
    names = [n for n, _ in model.named_parameters()]
    sums = clipped_sums(grads, [names], threshold_of=lambda _: CLIP)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p -= LR * sums[n] / normalizer


@pytest.mark.parametrize("poisson_sampling", [True, False], ids=["poisson", "fixed-size"])
def test_opacus_benchmark_steps_on_random_tensors_run_with_no_guarantee(poisson_sampling):
    engine, model, optimizer, initial, (images, labels), caught = opacus_benchmark(
        poisson_sampling=poisson_sampling)
    assert optimizer.steps_taken == 3
    # Normalized as Opacus normalizes: by the expected batch size (16), not the batch's own (12).
    assert optimizer.expected_batch_size == BATCH
    for _ in range(3):
        oracle_step(initial, images, labels, normalizer=BATCH)
    for (name, ours), theirs in zip(model.named_parameters(), initial.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12, msg=name)
    # The first such step warns, once.
    unsampled = [w for w in caught if "did not draw" in str(w.message)]
    assert len(unsampled) == 1 and issubclass(unsampled[0].category, UserWarning)
    assert "NO privacy guarantee" in str(unsampled[0].message)
    # Never a silent guarantee: epsilon is infinite and the report says why, from which step.
    assert engine.get_epsilon(1e-5) == math.inf
    assert engine.accountant.get_epsilon(1e-5) == math.inf
    report = engine.privacy_report(1e-5)
    assert report.composed_epsilon == math.inf and report.last_iterate_epsilon is None
    assert "from step 0 on" in report.no_guarantee and "3 of 3 steps" in report.no_guarantee
    assert "PRIVACY GUARANTEE      NONE" in str(report)


def test_the_noise_of_such_a_step_is_sigma_c_over_the_expected_batch_size():
    """The step is private in its mechanism (clipped, noise sigma C), only its batch is not
    accounted: with a zero gradient the update is the noise alone, std sigma C / B_expected."""
    from dpfused.opacus import PrivacyEngine

    model = nn.Linear(200, 50, bias=False).double()
    nn.init.zeros_(model.weight)
    engine = PrivacyEngine()
    model, optimizer, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(torch.zeros(N, 200)), batch_size=BATCH),
        noise_multiplier=2.0, max_grad_norm=CLIP)
    optimizer.zero_grad()
    (model(torch.zeros(8, 200, dtype=torch.float64)).sum() * 0).backward()
    with pytest.warns(UserWarning, match="did not draw"):
        optimizer.step()
    assert model.weight.std().item() == pytest.approx(2.0 * CLIP / BATCH, rel=0.05)


def test_a_budget_refuses_such_a_step_and_nothing_changes():
    from dpfused.opacus import PrivacyEngine

    model = vision_model()
    before = copy.deepcopy(model.state_dict())
    engine = PrivacyEngine()
    model, optimizer, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        data_loader=cifar_like_loader(), noise_multiplier=1.0, max_grad_norm=CLIP)
    optimizer.max_epsilon, optimizer.delta = 10.0, 1e-5  # what make_private(max_epsilon=) sets
    optimizer.zero_grad()
    F.cross_entropy(model(torch.randn(BATCH, 3, 8, 8, dtype=torch.float64)),
                    torch.randint(0, 10, (BATCH,))).backward()
    with pytest.raises(PrivacyBudgetExhausted, match="no batch drawn by the private data loader.*"
                                                     "no privacy guarantee.*max_epsilon=10"):
        optimizer.step()
    assert optimizer.steps_taken == 0 and engine.accountant.steps == 0
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_make_private_with_a_budget_refuses_it_too():
    engine = dpfused.PrivacyEngine()
    model = vision_model()
    model, optimizer, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        data_loader=cifar_like_loader(), noise_multiplier=1.0, max_grad_norm=CLIP,
        max_epsilon=5.0, delta=1e-5)
    optimizer.zero_grad()
    F.cross_entropy(model(torch.randn(4, 3, 8, 8, dtype=torch.float64)),
                    torch.randint(0, 10, (4,))).backward()
    with pytest.raises(PrivacyBudgetExhausted, match="no privacy guarantee"):
        optimizer.step()
    assert engine.get_epsilon(1e-5) == 0.0


def _private_mlp(**kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    data = TensorDataset(torch.randn(N, 5, dtype=torch.float64), torch.randint(0, 3, (N,)))
    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        data_loader=DataLoader(data, batch_size=BATCH), noise_multiplier=1.0,
        max_grad_norm=CLIP, noise_generator=torch.Generator().manual_seed(5),
        sampling_generator=torch.Generator().manual_seed(6), **kwargs)
    return engine, model, optimizer, loader


def _step(model, optimizer, batch):
    x, y = batch
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def _random_batch(size=BATCH):
    return torch.randn(size, 5, dtype=torch.float64), torch.randint(0, 3, (size,))


def test_epsilon_is_infinite_from_the_first_such_step_and_a_checkpoint_loads_consistently(tmp_path):
    engine, model, optimizer, loader = _private_mlp()
    drawn = iter(loader)
    _step(model, optimizer, next(drawn))
    _step(model, optimizer, next(drawn))
    finite = engine.get_epsilon(1e-5)
    assert 0 < finite < math.inf
    with pytest.warns(UserWarning, match="did not draw"):
        _step(model, optimizer, _random_batch())
    _step(model, optimizer, _random_batch())
    _step(model, optimizer, next(drawn))  # back on the loader: still no guarantee
    assert engine.get_epsilon(1e-5) == math.inf
    report = engine.privacy_report(1e-5)
    assert "from step 2 on" in report.no_guarantee and "2 of 5 steps" in report.no_guarantee
    assert report.sampling == "poisson" and report.noise_multiplier == 1.0
    # Resume: the ledger holding such steps is consistent with the steps and the sampler.
    engine.save_checkpoint(path=tmp_path / "ckpt.pt", module=model, optimizer=optimizer)
    resumed, model2, optimizer2, loader2 = _private_mlp()
    resumed.load_checkpoint(path=tmp_path / "ckpt.pt", module=model2, optimizer=optimizer2)
    assert optimizer2.steps_taken == 5 and resumed.get_epsilon(1e-5) == math.inf
    assert resumed.privacy_report(1e-5).no_guarantee == report.no_guarantee
    _step(model2, optimizer2, next(iter(loader2)))
    assert resumed.get_epsilon(1e-5) == math.inf and resumed.accountant.steps == 6
    # A budget on the resumed run refuses every further step (the ledger's epsilon is infinite).
    budgeted, model3, optimizer3, loader3 = _private_mlp(max_epsilon=50.0, delta=1e-5)
    budgeted.load_state_dict(engine.state_dict())
    with pytest.raises(PrivacyBudgetExhausted, match="epsilon to inf.*step 2 ran on batches the "
                                                     "private data loader did not draw"):
        _step(model3, optimizer3, next(iter(loader3)))


def test_passes_before_the_draw_make_the_drawn_batch_a_step_with_no_guarantee():
    """The book-keeper must not credit the loader's sampling to backward passes that ran before it
    drew the batch: here a random batch of the loader's exact size, then a draw that is never
    backpropagated. The example count matches; the step is still not the loader's."""
    engine, model, optimizer, loader = _private_mlp(sampling="cyclic")
    x, y = _random_batch(BATCH)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    next(iter(loader))  # drawn, never used
    with pytest.warns(UserWarning, match="did not draw"):
        optimizer.step()
    assert engine.get_epsilon(1e-5) == math.inf


@pytest.mark.parametrize("wrapping", ["ddp", "fsdp2"])
def test_data_parallel_training_refuses_such_a_step(wrapping, tmp_path):
    """Under DDP or FSDP2 every rank must hold its slice of one drawn logical batch; batches of
    the ranks' own cannot be summed and noised once. (One process in a gloo group suffices to
    reach the data-parallel paths.)"""
    with process_group(tmp_path):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
        if wrapping == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in (model[0], model[2], model):
                fully_shard(layer)
            wrapped = model
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        data = TensorDataset(torch.randn(N, 5, dtype=torch.float64), torch.randint(0, 3, (N,)))
        wrapped, optimizer, _ = dpfused.PrivacyEngine().make_private(
            module=wrapped, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
            data_loader=DataLoader(data, batch_size=BATCH), noise_multiplier=1.0,
            max_grad_norm=CLIP)
        x, y = _random_batch()
        optimizer.zero_grad()
        F.cross_entropy(wrapped(x), y).backward()
        with pytest.raises(RuntimeError, match="no batch drawn by the private data loader, under "
                                               "data parallel training.*no step was taken"):
            optimizer.step()
        assert optimizer.steps_taken == 0
        for name, value in model.named_parameters():
            assert torch.equal(value.detach(), before[name]), name


# ---- the ledger entry --------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["pld", "rdp"])
def test_the_ledger_entry_makes_every_epsilon_infinite(mechanism):
    import dp_accounting

    accountant = PrivacyAccountant(mechanism=mechanism, neighboring="add_remove")
    poisson = SampledStep(event=dp_accounting.PoissonSampledDpEvent(
        0.01, dp_accounting.GaussianDpEvent(5.0)), sampling="poisson")
    accountant.record(poisson)
    assert accountant.get_epsilon(1e-5) < 1
    # The budget screen uses RDP over the Poisson steps; it must not wave this step through.
    assert accountant.epsilon_if_over_budget(SampledStep.unsampled(examples=8), 1e-5,
                                             1e6) == math.inf
    accountant.record(SampledStep.unsampled(examples=8))  # no adjacency check applies to it
    accountant.record(poisson)
    assert accountant.get_epsilon(1e-5) == math.inf
    assert accountant.first_unguaranteed_step == 1 and accountant.epochs_started == 1
    assert isinstance(accountant.dp_event().events[-1], dp_accounting.NonPrivateDpEvent)
    restored = PrivacyAccountant(mechanism=mechanism, neighboring="add_remove")
    restored.load_state_dict(accountant.state_dict())
    assert restored.get_epsilon(1e-5) == math.inf and restored.first_unguaranteed_step == 1
    with pytest.raises(ValueError, match="needs NonPrivateDpEvent"):
        SampledStep(event=dp_accounting.GaussianDpEvent(1.0), sampling="unsampled")
