"""The engine's side of sampling and accounting: calibration, budget, report, exact resume (issue 3)."""

import math
import warnings

import dp_accounting
import dp_accounting.rdp
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from dpfused.opacus.schedulers import StepGradClip


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


# ---- issue 19.6: the last-iterate bound follows what each step did ------------------------------

SMOOTHNESS, DELTA = 1.0, 1e-5


def _cyclic_run(*, loss_reduction="mean", lr=0.2, decays=(0.0, 0.0), clip_schedule=False,
                sigma=1.0, epochs=4, engine=None):
    """A linear model on 32 examples in batches of 4 (m = 8 per epoch, the identity order); its
    weight and bias in two parameter groups with their own weight decays."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    optimizer = torch.optim.SGD([{"params": [model.weight], "weight_decay": decays[0]},
                                 {"params": [model.bias], "weight_decay": decays[1]}], lr=lr)
    engine = engine or dpfused.PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(_dataset(32), batch_size=4),
        noise_multiplier=sigma, max_grad_norm=1.0, sampling="cyclic", loss_reduction=loss_reduction,
        noise_generator=torch.Generator().manual_seed(1))
    scheduler = StepGradClip(optimizer, step_size=16, gamma=0.25) if clip_schedule else None
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y, reduction=loss_reduction).backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
    return engine, model, optimizer


def _formula_epsilon(*, lr, decays, normalizer, clips, sigma=1.0, b=4, m=8):
    """docs/design.md §7.4 by hand, for the runs above (constant eta, sigma and lambdas): step k moves
    by (eta/B_norm)(clipped sum + noise), c = max_g |1 - eta lambda_g| + eta (b/B_norm) L,
    s_k = eta sigma C_k / B_norm, Delta_k = eta C_k / B_norm; windows from each appearance of the
    worst position; (epsilon, delta) by dp_accounting's RDP conversion."""
    n, step = len(clips), lr / normalizer
    c = max(abs(1 - lr * lam) for lam in decays) + lr * (b / normalizer) * SMOOTHNESS
    worst = 0.0
    for p in range(m):
        uses = list(range(p, n, m))
        rho = 0.0
        for i, t0 in enumerate(uses):
            t1 = uses[i + 1] - 1 if i + 1 < len(uses) else n - 1
            noise = sum((c ** (t1 - k) * step * sigma * clips[k]) ** 2 for k in range(t0, t1 + 1))
            rho += 0.5 * (c ** (t1 - t0) * step * clips[t0]) ** 2 / noise
        worst = max(worst, rho)
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1 / math.sqrt(2 * worst)))
    return accountant.get_epsilon(DELTA)


def _last_iterate_epsilon(engine):
    report = engine.privacy_report(DELTA, smoothness=SMOOTHNESS)
    assert report.last_iterate_epsilon < report.composed_epsilon  # the bound itself is reported
    return report.last_iterate_epsilon


def test_last_iterate_of_a_summed_loss_steps_by_eta_times_the_sum():
    """loss_reduction="sum": B_norm = 1, the batch term is (b L)-Lipschitz. At eta = 0.05 = 0.2/b
    the run is the mean run at eta = 0.2 (0c36fdd reported less: the mean-loss map at eta/b)."""
    engine, _, _ = _cyclic_run(loss_reduction="sum", lr=0.05)
    expected = _formula_epsilon(lr=0.05, decays=[0.0], normalizer=1, clips=[1.0] * 32)
    assert _last_iterate_epsilon(engine) == pytest.approx(expected, rel=1e-9)
    mean_engine, _, _ = _cyclic_run(loss_reduction="mean", lr=0.2)
    assert _last_iterate_epsilon(mean_engine) == pytest.approx(expected, rel=1e-9)
    facts = [e.iterate for e in engine.accountant.entries]
    assert {(f.loss_reduction, f.normalizer, f.max_grad_norm) for f in facts} == {("sum", 1.0, 1.0)}


def test_last_iterate_with_weight_decay_on_the_weights_only():
    """Weight decay 5 on the weights, 0 on the bias: the bias coordinates do not contract, so
    c = 1 + eta L, not |1 - 5 eta| + eta L (0c36fdd kept max(lambda) = 5)."""
    engine, _, _ = _cyclic_run(decays=(5.0, 0.0))
    expected = _formula_epsilon(lr=0.2, decays=[5.0, 0.0], normalizer=4, clips=[1.0] * 32)
    assert _last_iterate_epsilon(engine) == pytest.approx(expected, rel=1e-9)
    no_decay, _, _ = _cyclic_run()
    assert _last_iterate_epsilon(no_decay) == pytest.approx(expected, rel=1e-9)
    assert {e.iterate.weight_decays for e in engine.accountant.entries} == {(5.0, 0.0)}


def test_last_iterate_with_a_grad_clip_scheduler_lowering_c():
    """StepGradClip lowers C from 1 to 0.25 after 16 steps: the later steps' noise sigma C_k is
    smaller while the earlier shifts are not (0c36fdd took C as constant, which cancels)."""
    engine, _, _ = _cyclic_run(clip_schedule=True)
    clips = [1.0] * 16 + [0.25] * 16
    expected = _formula_epsilon(lr=0.2, decays=[0.0], normalizer=4, clips=clips)
    assert _last_iterate_epsilon(engine) == pytest.approx(expected, rel=1e-9)
    constant, _, _ = _cyclic_run()
    assert expected > _last_iterate_epsilon(constant) * 1.05
    recorded = [e.iterate.max_grad_norm for e in engine.accountant.entries]
    assert recorded == pytest.approx(clips, rel=1e-12)


def test_make_private_with_epsilon_calibrates_the_last_iterate_of_what_the_optimizer_does():
    """Summed loss and weight decay on the weights only, read from the run, not assumed: the
    trained run's bound (by hand) meets the target. 0c36fdd calibrated the mean-loss map with
    lambda = 0 and under-noised."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    optimizer = torch.optim.SGD([{"params": [model.weight], "weight_decay": 5.0},
                                 {"params": [model.bias], "weight_decay": 0.0}], lr=0.05)
    engine = dpfused.PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=DataLoader(_dataset(32), batch_size=4),
        target_epsilon=3.0, target_delta=DELTA, epochs=4, max_grad_norm=1.0, sampling="cyclic",
        loss_reduction="sum", last_iterate={"smoothness": SMOOTHNESS})
    sigma = optimizer.noise_multiplier
    expected = _formula_epsilon(lr=0.05, decays=[5.0, 0.0], normalizer=1, clips=[1.0] * 32,
                                sigma=sigma)
    assert 2.99 < expected <= 3.0
    for _ in range(4):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y, reduction="sum").backward()
            optimizer.step()
    assert engine.accountant.get_last_iterate_epsilon(DELTA, smoothness=SMOOTHNESS) == \
        pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("optimizer_of, last_iterate, error, message", [
    (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.5), {"smoothness": 1.0, "weight_decay": 0.1},
     ValueError, "last_iterate\\['weight_decay'\\]=0.1 but the optimizer's parameter groups have "
                 "weight_decay \\[0.5\\]"),
    (lambda p: torch.optim.SGD(p, lr=0.1, maximize=True), {"smoothness": 1.0},
     dpfused.accounting.LastIterateUnavailable, "needs plain SGD .*got SGD"),
    (lambda p: torch.optim.Adam(p, lr=0.1), {"smoothness": 1.0},
     dpfused.accounting.LastIterateUnavailable, "needs plain SGD .*got Adam"),
])
def test_last_iterate_calibration_refuses_what_the_optimizer_contradicts(optimizer_of, last_iterate,
                                                                         error, message):
    model = nn.Linear(5, 3)
    with pytest.raises(error, match=message):
        dpfused.PrivacyEngine().make_private_with_epsilon(
            module=model, optimizer=optimizer_of(model.parameters()),
            data_loader=DataLoader(_dataset(32), batch_size=4), target_epsilon=3.0,
            target_delta=DELTA, epochs=1, max_grad_norm=1.0, sampling="cyclic",
            last_iterate=last_iterate)


def test_maximize_is_not_plain_sgd_for_the_last_iterate():
    engine, model, optimizer, loader = _setup(sampling="cyclic")
    optimizer.param_groups[0]["maximize"] = True
    _train(model, optimizer, loader, 3)
    report = engine.privacy_report(DELTA, smoothness=1.0)
    assert report.last_iterate_epsilon is None and "maximize" in report.last_iterate_reason


# ---- issue 25.2: a second make_private on one engine ------------------------------------------


def test_a_second_make_private_on_one_engine_counts_its_epochs_again(tmp_path):
    """Train one cyclic epoch, make_private again on the same engine (a new loader starts at epoch
    0), train another: two epochs, two Gaussians (0c36fdd merged them into one)."""
    engine = dpfused.PrivacyEngine()
    for phase in range(2):
        torch.manual_seed(phase)
        model = nn.Linear(5, 3)
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            data_loader=DataLoader(_dataset(), batch_size=10), noise_multiplier=1.0,
            max_grad_norm=1.0, sampling="cyclic")
        _train(model, optimizer, loader, len(loader))
    two_epochs = dp_accounting.pld.PLDAccountant()
    two_epochs.compose(dp_accounting.GaussianDpEvent(1.0), 2)
    assert engine.get_epsilon(DELTA) == pytest.approx(two_epochs.get_epsilon(DELTA), rel=2e-3)
    assert [e.sampled.phase for e in engine.accountant.entries] == [0] * 6 + [1] * 6
    report = engine.privacy_report(DELTA, smoothness=1.0)
    assert report.epochs == 2 and "2 phases" in report.last_iterate_reason
    # A resumed engine continues in the saved phase.
    resumed = dpfused.PrivacyEngine()
    model = nn.Linear(5, 3)
    resumed.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                         data_loader=DataLoader(_dataset(), batch_size=10), noise_multiplier=1.0,
                         max_grad_norm=1.0, sampling="cyclic")
    resumed.load_state_dict(engine.state_dict())
    assert resumed.accountant.phase == 1 and resumed.get_epsilon(DELTA) == engine.get_epsilon(DELTA)


# ---- issue 25.5: delta >= 1/N --------------------------------------------------------------------


DELTA_ADVICE = "delta=0.5 is >= 1/N = 1/32 \\(N = 32 examples.*use delta << 1/N"


def test_delta_at_or_above_one_over_n_warns_where_epsilon_is_reported_or_targeted():
    """delta >= 1/N allows publishing an example outright: 0c36fdd returned epsilon 0.0 for
    delta = 0.5 on N = 32 without a word. The number is still returned (it is right for that delta)."""
    engine = _cyclic_run(epochs=1)[0]
    with pytest.warns(UserWarning, match=DELTA_ADVICE):
        assert engine.get_epsilon(0.5) >= 0.0
    with pytest.warns(UserWarning, match=DELTA_ADVICE):
        engine.privacy_report(0.5)
    with pytest.warns(UserWarning, match="delta=0.03125 is >= 1/N = 1/32"):
        engine.get_epsilon(1 / 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.get_epsilon(DELTA)
        engine.privacy_report(DELTA)
        engine.get_epsilon(0.9 / 32)


def test_calibration_warns_for_delta_at_or_above_one_over_n():
    model = nn.Linear(5, 3)
    with pytest.warns(UserWarning, match=DELTA_ADVICE):
        dpfused.PrivacyEngine(accountant="rdp").make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            data_loader=DataLoader(_dataset(32), batch_size=4), target_epsilon=1.0,
            target_delta=0.5, epochs=1, max_grad_norm=1.0, sampling="cyclic")
    with pytest.warns(UserWarning, match=DELTA_ADVICE):
        dpfused.accounting.calibrate_noise_multiplier(
            target_epsilon=1.0, delta=0.5, sampling="cyclic", num_samples=32, batch_size=4,
            epochs=1, mechanism="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # N unknown: nothing to compare with
        dpfused.accounting.calibrate_noise_multiplier(target_epsilon=1.0, delta=0.5,
                                                      sampling="cyclic", epochs=1, mechanism="rdp")
