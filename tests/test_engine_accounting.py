"""The engine's side of sampling and accounting: calibration, budget, report, exact resume (issue 3)."""

import dp_accounting
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpfused


def _dataset(n=60):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


def _setup(*, seed=0, optimizer_cls=torch.optim.SGD, engine_state=None, **kwargs):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    optimizer = optimizer_cls(model.parameters(), lr=0.05)
    engine = dpfused.PrivacyEngine()
    kwargs.setdefault("noise_multiplier", 1.0)
    kwargs.setdefault("max_grad_norm", 1.0)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(_dataset(), batch_size=10),
        noise_generator=torch.Generator().manual_seed(seed + 1),
        sampling_generator=torch.Generator().manual_seed(seed + 2), **kwargs)
    return engine, model, optimizer, loader


def _batches(loader):
    while True:  # epochs back to back; a fresh iter() continues from the sampler's position
        yield from loader


def _train(model, optimizer, loader, steps, seen=None):
    it = _batches(loader)
    for _ in range(steps):
        x, y = next(it)
        if seen is not None:
            seen.append(x.clone())
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_poisson_epsilon_is_dp_accountings_own_number():
    engine, model, optimizer, loader = _setup(noise_multiplier=1.1)
    _train(model, optimizer, loader, 12)
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        10 / 60, dp_accounting.GaussianDpEvent(1.1)), 12)
    assert engine.get_epsilon(1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


@pytest.mark.parametrize("sampling", ["poisson", "cyclic"])
def test_make_private_with_epsilon_spends_at_most_the_target(sampling):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=DataLoader(_dataset(), batch_size=10), target_epsilon=3.0, target_delta=1e-5,
        epochs=2, max_grad_norm=1.0, sampling=sampling)
    for _ in range(2):
        _train(model, optimizer, loader, len(loader))
    epsilon = engine.get_epsilon(1e-5)
    assert epsilon <= 3.0 and epsilon > 2.9


def test_budget_refuses_the_step_that_would_exceed_it_and_applies_nothing():
    engine, model, optimizer, loader = _setup(noise_multiplier=0.8, max_epsilon=2.0, delta=1e-5)
    with pytest.raises(dpfused.PrivacyBudgetExhausted, match="max_epsilon=2.0"):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            before = [p.detach().clone() for p in model.parameters()]
            steps_before = engine.accountant.steps
            optimizer.step()
    assert engine.accountant.steps == steps_before
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert engine.get_epsilon(1e-5) <= 2.0


@pytest.mark.parametrize("sampling", ["poisson", "cyclic", "shuffle"])
def test_resume_gives_the_same_batches_and_epsilon(sampling, tmp_path):
    kwargs = dict(sampling=sampling, shuffle_once=sampling == "cyclic")
    # uninterrupted: 9 steps (crosses an epoch boundary: 6 batches per epoch)
    engine, model, optimizer, loader = _setup(**kwargs)
    straight = []
    _train(model, optimizer, loader, 4)
    _train(model, optimizer, loader, 5, straight)
    # stopped after 4 steps, checkpointed, resumed in fresh objects
    engine_a, model_a, optimizer_a, loader_a = _setup(**kwargs)
    _train(model_a, optimizer_a, loader_a, 4)
    torch.save({"engine": engine_a.state_dict(), "model": model_a.state_dict(),
                "optimizer": optimizer_a.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    engine_b, model_b, optimizer_b, loader_b = _setup(seed=0, **kwargs)
    engine_b.load_state_dict(state["engine"])
    model_b.load_state_dict(state["model"])
    optimizer_b.load_state_dict(state["optimizer"])
    resumed = []
    _train(model_b, optimizer_b, loader_b, 5, resumed)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    assert engine_b.get_epsilon(1e-5) == pytest.approx(engine.get_epsilon(1e-5), rel=1e-12)


@pytest.mark.parametrize("adaptive", [False, True])
def test_opacus_style_checkpoint_resumes_batches_parameters_and_epsilon(adaptive, tmp_path):
    kwargs = dict(sampling="poisson", noise_multiplier=0.0, clipping="per_layer",
                  adaptive_clipping=dpfused.AdaptiveClipping(count_noise_std=1e-9) if adaptive
                  else None)  # no noise: the continuation is exactly reproducible
    engine, model, optimizer, loader = _setup(**kwargs)
    _train(model, optimizer, loader, 4)
    engine.save_checkpoint(path=tmp_path / "ckpt.pt", module=model, optimizer=optimizer,
                           checkpoint_dict={"epoch": 0})
    straight = []
    _train(model, optimizer, loader, 5, straight)

    engine_b, model_b, optimizer_b, loader_b = _setup(seed=7, **kwargs)  # other init and seeds
    checkpoint = engine_b.load_checkpoint(path=tmp_path / "ckpt.pt", module=model_b,
                                          optimizer=optimizer_b)
    assert checkpoint["epoch"] == 0
    resumed = []
    _train(model_b, optimizer_b, loader_b, 5, resumed)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model_b.parameters()))
    # Equal: the count noise continues the saved noise stream (issue 19.3).
    assert [g.threshold for g in optimizer_b.instrumentation.groups] == [
        g.threshold for g in optimizer.instrumentation.groups]
    assert engine_b.get_epsilon(1e-5) == engine.get_epsilon(1e-5)
    with pytest.raises(TypeError, match="noise_scheduler must be a scheduler"):
        engine_b.save_checkpoint(path=tmp_path / "x.pt", module=model_b, noise_scheduler=object())


def test_get_noise_multiplier_matches_calibration_and_opacus():
    from opacus.accountants.utils import get_noise_multiplier as opacus_get_noise_multiplier

    ours = dpfused.get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.01,
                                        epochs=2, accountant="rdp", epsilon_tolerance=0.01)
    theirs = opacus_get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.01,
                                         epochs=2, accountant="rdp", epsilon_tolerance=0.01)
    assert ours == pytest.approx(theirs, rel=0.02)  # both bisect; Opacus to 0.01 in epsilon
    accountant = dpfused.accounting.PrivacyAccountant(mechanism="rdp")
    for _ in range(200):
        accountant.record(dpfused.accounting.SampledStep(
            event=dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(ours)),
            sampling="poisson"))
    assert 1.99 < accountant.get_epsilon(1e-5) <= 2.0


def test_report_gives_last_iterate_for_cyclic_sgd_and_a_reason_otherwise():
    engine, model, optimizer, loader = _setup(sampling="cyclic")
    _train(model, optimizer, loader, 12)
    report = engine.privacy_report(1e-5, smoothness=1.0)
    assert report.last_iterate_epsilon is not None
    assert report.last_iterate_epsilon <= report.composed_epsilon
    assert "cyclic" in str(report)

    engine, model, optimizer, loader = _setup(sampling="poisson")
    _train(model, optimizer, loader, 3)
    report = engine.privacy_report(1e-5, smoothness=1.0)
    assert report.last_iterate_epsilon is None and "cyclic" in report.last_iterate_reason

    engine, model, optimizer, loader = _setup(sampling="cyclic", optimizer_cls=torch.optim.Adam)
    _train(model, optimizer, loader, 3)
    report = engine.privacy_report(1e-5, smoothness=1.0)
    assert report.last_iterate_epsilon is None and "SGD" in report.last_iterate_reason


def test_make_private_with_epsilon_can_calibrate_the_last_iterate_bound():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=DataLoader(_dataset(), batch_size=10), target_epsilon=2.0, target_delta=1e-5,
        epochs=3, max_grad_norm=1.0, sampling="cyclic", last_iterate={"smoothness": 1.0})
    composed_sigma = dpfused.accounting.calibrate_noise_multiplier(
        target_epsilon=2.0, delta=1e-5, sampling="cyclic", num_samples=60, batch_size=10, epochs=3)
    assert optimizer.noise_multiplier < composed_sigma  # the last-iterate bound needs less noise
    for _ in range(3):
        _train(model, optimizer, loader, len(loader))
    report = engine.privacy_report(1e-5, smoothness=1.0)
    assert report.last_iterate_epsilon <= 2.0 < report.composed_epsilon
