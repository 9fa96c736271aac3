"""PrivacyEngine.make_private_deferred in one process: the private loader first, the module and
optimizer made private later (``DeferredPrivacy.complete``; docs/design.md §9). The 2-process FSDP2
run under DPTrainer is tests/test_hf_fsdp2.py's."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import dpfused
from dpfused.engine import DeferredPrivacy
from tests.test_adaptive import _data, _mlp


def _arguments(model, **overrides):
    values = dict(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                  data_loader=DataLoader(_data(), batch_size=6), noise_multiplier=0.7,
                  max_grad_norm=0.5, noise_generator=torch.Generator().manual_seed(1),
                  sampling_generator=torch.Generator().manual_seed(2))
    values.update(overrides)
    return values


def _train(model, optimizer, loader, steps=3):
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_deferred_then_complete_is_make_private():
    """Same seeds: the same batches, noise, parameters and epsilon as make_private."""
    direct, deferred_model = _mlp(), _mlp()
    engine = dpfused.PrivacyEngine(accountant="rdp")
    _train(*engine.make_private(**_arguments(direct)))
    deferred_engine = dpfused.PrivacyEngine(accountant="rdp")
    arguments = _arguments(deferred_model)
    deferred = deferred_engine.make_private_deferred(sharded=False, **arguments)
    assert isinstance(deferred, DeferredPrivacy) and len(deferred.data_loader) == 4
    model, optimizer, loader = deferred.complete(module=deferred_model,
                                                 optimizer=arguments["optimizer"])
    assert loader is deferred.data_loader and model is deferred_model
    _train(model, optimizer, loader)
    for a, b in zip(direct.parameters(), deferred_model.parameters()):
        assert torch.equal(a, b)
    assert deferred_engine.get_epsilon(1e-5) == engine.get_epsilon(1e-5) > 0


def test_the_loader_refuses_to_draw_before_complete():
    """A batch drawn before the model is instrumented would train on unclipped gradients."""
    model = _mlp()
    deferred = dpfused.PrivacyEngine().make_private_deferred(sharded=False, **_arguments(model))
    with pytest.raises(RuntimeError, match="iterated before DeferredPrivacy.complete"):
        next(iter(deferred.data_loader))


def test_complete_refuses_another_model_a_wrong_layout_and_a_second_call():
    model = _mlp()
    arguments = _arguments(model)
    deferred = dpfused.PrivacyEngine().make_private_deferred(sharded=True, **arguments)
    with pytest.raises(ValueError, match="module is not the module passed to "
                                         "make_private_deferred"):
        deferred.complete(module=_mlp(), optimizer=arguments["optimizer"])
    with pytest.raises(ValueError, match="optimizer is not the optimizer"):
        deferred.complete(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="not sharded with FSDP2 but the data loader was made "
                                         "with sharded=True"):
        deferred.complete(module=model, optimizer=arguments["optimizer"])
    from dpfused.instrument import _ACTIVE

    assert model not in _ACTIVE  # nothing half-applied: the refused calls instrumented nothing
    arguments = _arguments(model)
    deferred = dpfused.PrivacyEngine().make_private_deferred(sharded=False, **arguments)
    deferred.complete(module=model, optimizer=arguments["optimizer"])
    with pytest.raises(ValueError, match="complete was called already"):
        deferred.complete(module=model, optimizer=arguments["optimizer"])


def test_every_make_private_check_runs_in_stage_one():
    model = _mlp()
    with pytest.raises(ValueError, match="max_grad_norm"):
        dpfused.PrivacyEngine().make_private_deferred(sharded=False,
                                                      **_arguments(model, max_grad_norm=-1.0))
    with pytest.raises(TypeError):
        dpfused.PrivacyEngine().make_private_deferred(sharded=False, no_such_keyword=1,
                                                      **_arguments(model))
    with pytest.raises(TypeError, match="sharded must be True or False"):
        dpfused.PrivacyEngine().make_private_deferred(sharded="yes", **_arguments(model))


def test_deferred_with_epsilon_calibrates_as_make_private_with_epsilon():
    calibrated = {}
    for how in ("make_private_with_epsilon", "make_private_deferred_with_epsilon"):
        model = _mlp()
        arguments = _arguments(model)
        del arguments["noise_multiplier"]
        engine = dpfused.PrivacyEngine(accountant="rdp")
        extra = {"sharded": False} if "deferred" in how else {}
        result = getattr(engine, how)(target_epsilon=2.0, target_delta=1e-5, epochs=2,
                                      **extra, **arguments)
        if isinstance(result, DeferredPrivacy):
            _, optimizer, _ = result.complete(module=model, optimizer=arguments["optimizer"])
        else:
            _, optimizer, _ = result
        calibrated[how] = optimizer.noise_multiplier
    assert len(set(calibrated.values())) == 1, calibrated
