"""PrivacyEngine end to end: exact gradients, accumulation, reductions, noise, the step contract."""

import contextlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from dpfused.opacus import BatchMemoryManager
from tests import models
from tests.oracle import clipped_sums, per_example_grads, snapshot


def _data(n=24, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y)


def _mlp(seed=0, d=6, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, classes)).double()


def _private(model, *, batch_size=6, noise=0.0, clip=0.5, dataset=None, **kwargs):
    dataset = dataset or _data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = dpfused.PrivacyEngine()
    kwargs.setdefault("sampling", "cyclic")
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(dataset, batch_size=batch_size),
        noise_multiplier=noise, max_grad_norm=clip, **kwargs)
    return engine, model, optimizer, loader


def _expected_grads(reference, x, y, clip, divisor):
    def example_loss(call, batched):
        xs, ys = batched
        return F.cross_entropy(call(xs), ys, reduction="sum")

    grads = per_example_grads(reference, example_loss, (x, y))
    sums = clipped_sums(grads, [list(grads)], threshold_of=lambda names: clip)
    return {n: s / divisor for n, s in sums.items()}


def _first_step(model, optimizer, loader, reduction="mean"):
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y, reduction=reduction).backward()
        optimizer.step()
        return x, y
    raise AssertionError("empty loader")


@pytest.mark.parametrize("reduction,divisor", [("mean", 6.0), ("sum", 1.0)])
def test_gradient_equals_clipped_sum_over_batch_size(reduction, divisor):
    model = _mlp()
    reference = snapshot(model)
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, model, optimizer, loader = _private(model, loss_reduction=reduction)
    x, y = _first_step(model, optimizer, loader, reduction)
    expected = _expected_grads(reference, x, y, 0.5, divisor)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(p.detach(), params_before[name] - 0.1 * expected[name])


def test_physical_batches_accumulate_to_one_logical_batch():
    results = []
    for physical in (None, 4):
        model = _mlp()
        _, model, optimizer, loader = _private(model, batch_size=12,
                                               max_physical_batch_size=physical)
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if optimizer.steps_taken == 1:
                break
        results.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert optimizer.steps_skipped == (0 if physical is None else 2)
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-10, atol=1e-12)


def test_batch_memory_manager_equals_max_physical_batch_size():
    # Opacus' context manager: the same physical split, accumulation and single noise draw.
    results = []
    for use_manager in (False, True):
        model = _mlp()
        _, model, optimizer, loader = _private(
            model, batch_size=12, noise=0.5, noise_generator=torch.Generator().manual_seed(4),
            max_physical_batch_size=None if use_manager else 5)
        manager = BatchMemoryManager(data_loader=loader, max_physical_batch_size=5,
                                     optimizer=optimizer)
        with (manager if use_manager else contextlib.nullcontext(loader)) as batches:
            sizes = []
            for x, y in batches:
                sizes.append(len(x))
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                if optimizer.steps_taken == 2:
                    break
        assert sizes == [5, 5, 2, 5, 5, 2] and optimizer.steps_skipped == 4
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loader.max_physical_batch_size is None  # restored on exit


def test_batch_memory_manager_refuses_a_loader_of_another_optimizer():
    _, _, optimizer, loader = _private(_mlp())
    _, _, _, other_loader = _private(_mlp())
    with pytest.raises(ValueError, match="another data loader"):
        BatchMemoryManager(data_loader=other_loader, max_physical_batch_size=2, optimizer=optimizer)
    with pytest.raises(TypeError, match="must be the DPDataLoader"):
        BatchMemoryManager(data_loader=[1, 2], max_physical_batch_size=2, optimizer=optimizer)
    with pytest.raises(ValueError, match="max_physical_batch_size must be an integer >= 1"):
        BatchMemoryManager(data_loader=loader, max_physical_batch_size=0, optimizer=optimizer)


@pytest.mark.parametrize("physical", [None, 2])
def test_noise_std_is_sigma_c_over_b_and_added_once(physical):
    sigma, clip, batch = 1.3, 0.7, 8
    model = models.zero_gradient_model()
    dataset = TensorDataset(torch.randn(32, 120, dtype=torch.float64), torch.zeros(32))
    gen = torch.Generator().manual_seed(1)
    _, model, optimizer, loader = _private(model, batch_size=batch, noise=sigma, clip=clip,
                                           dataset=dataset, noise_generator=gen,
                                           max_physical_batch_size=physical)
    for x, _ in loader:
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
        if optimizer.steps_taken == 1:
            break
    grad = model.lin.weight.grad.flatten()
    expected = sigma * clip / batch
    # 14400 coordinates: the sample std is within 3% of the truth with overwhelming probability.
    assert abs(grad.std().item() / expected - 1) < 0.03
    assert abs(grad.mean().item()) < 4 * expected / math.sqrt(grad.numel())


def test_empty_poisson_batch_still_steps_with_noise():
    model = _mlp()
    dataset = _data(n=50)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(dataset, batch_size=1),
        noise_multiplier=1.0, max_grad_norm=1.0, sampling="poisson",
        sampling_generator=torch.Generator().manual_seed(0))
    empty_seen = 0
    for x, y in loader:
        before = model[0].weight.detach().clone()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()  # a zero-size batch goes through like any other
        optimizer.step()
        if len(x) == 0:
            empty_seen += 1
            assert not torch.equal(before, model[0].weight.detach()), "empty batch took no step"
    assert empty_seen > 0
    assert optimizer.steps_taken == len(loader)
    assert engine.get_epsilon(1e-5) > 0


def test_step_without_backward_is_refused():
    _, model, optimizer, loader = _private(_mlp())
    next(iter(loader))
    with pytest.raises(RuntimeError, match="without loss.backward"):
        optimizer.step()


def test_backward_after_step_without_zero_grad_is_refused():
    _, model, optimizer, loader = _private(_mlp())
    it = iter(loader)
    x, y = next(it)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    x, y = next(it)
    with pytest.raises(ValueError, match="zero_grad"):
        F.cross_entropy(model(x), y).backward()


def test_two_backwards_of_one_batch_are_refused_at_step():
    _, model, optimizer, loader = _private(_mlp())
    x, y = next(iter(loader))
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="exactly one backward pass"):
        optimizer.step()


def test_same_module_is_returned_and_detach_restores_it():
    model = _mlp()
    keys = list(model.state_dict())
    _, private, _, _ = _private(model)
    assert private is model and list(private.state_dict()) == keys
    assert "forward" in model[0].__dict__
    dpfused.detach(model)
    assert "forward" not in model[0].__dict__
    with pytest.raises(ValueError, match="not instrumented"):
        dpfused.detach(model)


def test_generate_works_on_an_instrumented_gpt2():
    from tests.models import gpt2

    case = gpt2(2)
    model = case.model.float()
    dataset = TensorDataset(torch.randint(0, 40, (8, 7)))
    engine = dpfused.PrivacyEngine()
    model, _, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(dataset, batch_size=2), noise_multiplier=1.0, max_grad_norm=1.0)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)
    assert model.transformer.wte.weight is model.lm_head.weight
    dpfused.detach(model)


def test_bf16_model_norms_in_fp32():
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _mlp().to(dtype)
        dataset = TensorDataset(_data().tensors[0].to(dtype), _data().tensors[1])
        _, model, optimizer, loader = _private(model, dataset=dataset, clipping="per_layer")
        _first_step(model, optimizer, loader)
        results[dtype] = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        assert all(p.grad.dtype == dtype for p in model.parameters())
    err = (results[torch.bfloat16] - results[torch.float32]).norm() / results[torch.float32].norm()
    assert err < 3e-2


def test_explain_lists_layers_and_paths():
    _, model, optimizer, loader = _private(_mlp(), clipping="per_layer")
    _first_step(model, optimizer, loader)
    table = dpfused.explain(model)
    assert "0" in table and "linear" in table and "ghost" in table


def test_parameter_used_outside_its_forward_is_refused():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, x):
            return self.lin(x) + F.linear(x, self.lin.weight)

    _, model, optimizer, loader = _private(Sneaky().double())
    x, y = next(iter(loader))
    with pytest.raises(ValueError, match="outside its module's forward"):
        F.cross_entropy(model(x), y).backward()


def test_non_finite_norms_are_reported_and_no_step_is_taken():
    _, model, optimizer, loader = _private(_mlp())
    x, y = next(iter(loader))
    x = x.clone()
    x[2, 0] = float("inf")
    optimizer.zero_grad()
    with pytest.raises(ValueError, match="non-finite per-example gradient norm.*examples \\[2\\]"):
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="zero_grad"):
        optimizer.step()


def test_empty_batch_of_a_hf_model_steps_without_backward():
    """HF models cannot forward zero examples; the loop calls step() alone and noise is added."""
    from tests.models import gpt2

    model = gpt2(2).model.float()
    dataset = TensorDataset(torch.randint(0, 40, (40, 7)))
    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(dataset, batch_size=1), noise_multiplier=1.0, max_grad_norm=1.0,
        sampling_generator=torch.Generator().manual_seed(3))
    for (ids,) in loader:
        optimizer.zero_grad()
        if len(ids):
            dpfused.per_example_lm_loss(model(input_ids=ids).logits, ids).backward()
        before = model.lm_head.weight.detach().clone()
        optimizer.step()
        if len(ids) == 0:
            assert not torch.equal(before, model.lm_head.weight.detach())
            break
    else:
        pytest.fail("no empty batch drawn")
    dpfused.detach(model)
