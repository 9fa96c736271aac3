"""BandMF correlated noise (issue 22 item 1): the strategies, the streaming noise and its covariance,
bands=1 as DP-SGD bit for bit, the b-min-sep sampler, the accounting against dp_accounting, the
float64 check of one example's contribution to the released trajectory, and the refusals."""

import math

import dp_accounting
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from dp_accounting import pld, rdp
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from dpfused import privacy_math
from dpfused.bandmf import (
    BandMF,
    NoiseHistory,
    optimized_toeplitz_coefficients,
    sqrt_toeplitz_coefficients,
    strategy_matrix,
    toeplitz_error,
)
from dpfused.sampling import CyclicPoissonBatchSampler
from tests import models
from tests.oracle import clipped_sums, per_example_grads, snapshot

# ---- strategies ---------------------------------------------------------------------------------


def test_sqrt_coefficients_are_the_normalized_binomial_series():
    raw = [math.comb(2 * k, k) / 4**k for k in range(6)]
    norm = math.sqrt(sum(r * r for r in raw))
    assert sqrt_toeplitz_coefficients(6) == pytest.approx([r / norm for r in raw], rel=1e-15)
    assert privacy_math.max_column_norm(sqrt_toeplitz_coefficients(6)) == pytest.approx(1, 1e-15)
    assert sqrt_toeplitz_coefficients(1) == (1.0,)  # one band: the identity, exactly


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("coefficients", [(1.0,), sqrt_toeplitz_coefficients(4), (0.9, -0.3, 0.2)])
def test_closed_form_error_equals_the_matrix_computation(coefficients, momentum):
    steps = 40
    m = strategy_matrix(coefficients, steps)
    beta = torch.tensor([momentum**k for k in range(steps)], dtype=torch.float64)
    momentum_filter = strategy_matrix(beta.tolist(), steps)
    workload = torch.tril(torch.ones(steps, steps, dtype=torch.float64)) @ momentum_filter
    b = workload @ torch.linalg.inv(m)
    col = m.norm(dim=0).max()
    expected = float((b.norm() ** 2 * col**2 / steps).sqrt())
    assert toeplitz_error(coefficients, steps=steps, momentum=momentum) == pytest.approx(expected, 1e-10)


@pytest.mark.parametrize("bands,steps,momentum", [(4, 200, 0.0), (8, 1000, 0.0), (4, 300, 0.9)])
def test_optimized_strategy_beats_sqrt_and_dp_sgd(bands, steps, momentum):
    optimized = optimized_toeplitz_coefficients(bands, steps, momentum)
    assert len(optimized) == bands
    assert privacy_math.max_column_norm(optimized) == pytest.approx(1.0, 1e-12)
    error = toeplitz_error(optimized, steps=steps, momentum=momentum)
    assert error <= toeplitz_error(sqrt_toeplitz_coefficients(bands), steps=steps,
                                   momentum=momentum) + 1e-12
    assert error < toeplitz_error((1.0,), steps=steps, momentum=momentum)


# ---- the streaming noise ------------------------------------------------------------------------


def _zero_gradient_run(noise, *, steps, sigma=1.3, clip=0.7, width=120, sampling="cyclic_poisson",
                       seed=0, secure_mode=False):
    """Released gradients of a model whose gradients are 0: the noise alone, step by step."""
    torch.manual_seed(seed)
    model = models.zero_gradient_model(width)
    data = TensorDataset(torch.zeros(40, width, dtype=torch.float64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = dpfused.PrivacyEngine(secure_mode=secure_mode)
    seeded = {} if secure_mode else dict(
        noise_generator=torch.Generator().manual_seed(seed + 1),
        sampling_generator=torch.Generator().manual_seed(seed + 2))
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=4),
        noise_multiplier=sigma, max_grad_norm=clip, loss_reduction="sum", sampling=sampling,
        noise=noise, **seeded)
    released = []
    while len(released) < steps:
        for (x,) in loader:
            optimizer.zero_grad()
            if len(x):
                model(x).sum().backward()
            optimizer.step()
            released.append(model.lin.weight.grad.detach().flatten().clone())
            if len(released) == steps:
                break
    return torch.stack(released), optimizer  # (T, d)


@pytest.mark.parametrize("secure_mode", [False, True])
def test_noise_covariance_is_sigma_c_squared_minv_minv_transposed(secure_mode):
    """Per coordinate, the T released noises have covariance sigma^2 C^2 (M^-1)(M^-1)^T; also
    from secure mode's ChaCha20 Gaussians (the history is the same secret state there)."""
    sigma, clip, steps, noise = 1.3, 0.7, 9, BandMF(bands=4)
    released, _ = _zero_gradient_run(noise, steps=steps, sigma=sigma, clip=clip,
                                     secure_mode=secure_mode)
    d = released.shape[1]
    empirical = released @ released.T / d
    inverse = torch.linalg.inv(strategy_matrix(noise.coefficients, steps))
    expected = (sigma * clip) ** 2 * inverse @ inverse.T
    var = expected.diagonal()
    standard_error = ((var[:, None] * var[None, :] + expected**2) / d).sqrt()
    assert bool(((empirical - expected).abs() <= 5 * standard_error).all()), (
        (empirical - expected).abs() / standard_error).max()
    # and the correlation is really there (not the identity's)
    assert float(empirical[1, 0]) < -0.1 * float(var[0])


def test_optimized_strategy_noise_follows_its_matrix():
    sigma, clip, steps = 1.0, 1.0, 8
    noise = BandMF(bands=3, strategy="optimized", steps=steps)
    released, _ = _zero_gradient_run(noise, steps=steps, sigma=sigma, clip=clip, width=150)
    inverse = torch.linalg.inv(strategy_matrix(noise.coefficients, steps))
    expected = inverse @ inverse.T
    empirical = released @ released.T / released.shape[1]
    assert float((empirical - expected).abs().max()) < 0.15


def test_one_band_is_dp_sgd_bit_for_bit():
    """Same generator draws, same numbers: the released gradients and the final model."""
    dp_sgd, _ = _zero_gradient_run(None, steps=7, sampling="poisson")
    one_band, optimizer = _zero_gradient_run(BandMF(bands=1), steps=7, sampling="poisson")
    assert torch.equal(dp_sgd, one_band)
    assert optimizer.noise_history.nbytes == 0  # nothing kept


def test_one_band_training_is_bit_for_bit_and_accounted_the_same():
    results = []
    for noise in (None, BandMF(bands=1)):
        engine, model, optimizer, loader = _private_mlp(noise=noise, sampling="poisson")
        _train(model, optimizer, loader, epochs=1)
        results.append((torch.cat([p.detach().flatten() for p in model.parameters()]),
                        engine.get_epsilon(1e-5)))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]


def test_physical_batches_add_the_correlated_noise_once_per_logical_step():
    results = []
    for physical in (None, 1):
        engine, model, optimizer, loader = _private_mlp(noise=BandMF(bands=3),
                                                        max_physical_batch_size=physical)
        _train(model, optimizer, loader, epochs=1)
        results.append((torch.cat([p.detach().flatten() for p in model.parameters()]),
                        engine.accountant.steps))
    assert results[0][1] == results[1][1] == 12
    assert torch.allclose(results[0][0], results[1][0], rtol=0, atol=1e-12)


def test_history_holds_bands_minus_one_buffers_per_parameter():
    _, optimizer = _zero_gradient_run(BandMF(bands=5), steps=6, width=20)
    param = optimizer.instrumentation.params[0]
    assert optimizer.noise_history.nbytes == 4 * param.numel() * 8  # float64 model


# ---- the sampler --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_samples,rate,bands", [(50, 0.05, 4), (103, 0.08, 3), (9, 0.3, 3),
                                                     (30, 0.02, 7)])
def test_cyclic_poisson_never_puts_an_example_in_two_steps_less_than_b_apart(num_samples, rate,
                                                                             bands):
    sampler = CyclicPoissonBatchSampler(num_samples=num_samples, sample_rate=rate,
                                        partitions=bands, generator=torch.Generator().manual_seed(3))
    assert sampler.batches_per_epoch % bands == 0
    last, step = {}, 0
    for _ in range(4):
        for batch in sampler:
            for i in batch:
                assert step - last.get(i, -bands) >= bands, (i, last[i], step)
                assert int(sampler.assignment[i]) == step % bands  # only its partition's steps
                last[i] = step
            step += 1
    assert len(last) > num_samples // 2


def test_cyclic_poisson_rate_and_expected_batch():
    sampler = CyclicPoissonBatchSampler(num_samples=400, sample_rate=0.05, partitions=4,
                                        generator=torch.Generator().manual_seed(0))
    assert sampler.partition_rate == pytest.approx(0.2)
    sizes = [len(b) for _ in range(25) for b in sampler]
    assert np.mean(sizes) == pytest.approx(20.0, rel=0.1)  # q N


def test_cyclic_poisson_resumes_mid_epoch_with_the_same_batches():
    make = lambda: CyclicPoissonBatchSampler(num_samples=60, sample_rate=0.1, partitions=3,
                                             generator=torch.Generator().manual_seed(5))
    full = make()
    reference = [b for _ in range(2) for b in full]
    first = make()
    iterator = iter(first)
    head = [next(iterator) for _ in range(4)]
    state = first.state_dict()
    resumed = make()
    resumed.generator.manual_seed(99)  # a different stream: the state must restore it
    resumed.load_state_dict(state)
    tail = [b for b in resumed] + [b for b in resumed]
    assert head + tail[: len(reference) - 4] == reference


# ---- accounting ---------------------------------------------------------------------------------


def _data(n=48, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g, dtype=torch.float64),
                         torch.randint(0, 3, (n,), generator=g))


def _private_mlp(*, noise, sampling="cyclic_poisson", batch_size=4, accountant="pld", sigma=1.0,
                 lr=0.1, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    engine = dpfused.PrivacyEngine(accountant=accountant)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(_data(), batch_size=batch_size),
        noise_multiplier=sigma, max_grad_norm=1.0, sampling=sampling, noise=noise,
        noise_generator=torch.Generator().manual_seed(seed + 1),
        sampling_generator=torch.Generator().manual_seed(seed + 2), **kwargs)
    return engine, model, optimizer, loader


def _train(model, optimizer, loader, *, epochs=1, steps=None):
    taken = 0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            if len(x):
                F.cross_entropy(model(x), y).backward()
            optimizer.step()
            taken += 1
            if steps is not None and taken == steps:
                return


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_epsilon_is_dp_accounting_of_one_sampled_gaussian_per_cycle(accountant):
    noise = BandMF(bands=4)
    engine, model, optimizer, loader = _private_mlp(noise=noise, accountant=accountant, sigma=1.1)
    _train(model, optimizer, loader, steps=10)  # 10 steps: 3 cycles, the last partial
    sigma = 1.1 / math.sqrt(sum(c * c for c in noise.coefficients))
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(4 * 4 / 48, dp_accounting.GaussianDpEvent(sigma)), 3)
    reference = pld.PLDAccountant() if accountant == "pld" else rdp.RdpAccountant()
    reference.compose(event)
    assert engine.get_epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-6)
    report = engine.privacy_report(1e-5)
    assert "BandMF, 4 bands" in report.noise and report.sampling == "cyclic_poisson"
    assert report.partitions == 4 and "cyclic Poisson" in str(report)


def test_cyclic_sampling_with_bands_is_one_gaussian_per_epoch():
    engine, model, optimizer, loader = _private_mlp(noise=BandMF(bands=3), sampling="cyclic",
                                                    sigma=2.0)
    _train(model, optimizer, loader, epochs=2)  # 12 batches per epoch >= 3 bands
    reference = pld.PLDAccountant()
    reference.compose(dp_accounting.GaussianDpEvent(2.0 / math.sqrt(2)), 1)
    assert engine.get_epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-3)
    report = engine.privacy_report(1e-5, smoothness=1.0)
    assert report.last_iterate_epsilon is None and "BandMF" in report.last_iterate_reason


def test_make_private_with_epsilon_calibrates_bandmf():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).double()
    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(), batch_size=4), target_epsilon=3.0, target_delta=1e-5,
        steps=14, max_grad_norm=1.0, sampling="cyclic_poisson",
        noise=BandMF(bands=4, strategy="optimized", steps=14),
        sampling_generator=torch.Generator().manual_seed(1))
    _train(model, optimizer, loader, epochs=2, steps=14)
    assert 0.97 * 3.0 <= engine.get_epsilon(1e-5) <= 3.0


def test_budget_stop_with_bandmf():
    engine, model, optimizer, loader = _private_mlp(noise=BandMF(bands=2), sigma=0.8,
                                                    max_epsilon=3.0, delta=1e-5)
    with pytest.raises(dpfused.PrivacyBudgetExhausted):
        _train(model, optimizer, loader, epochs=50)
    assert engine.get_epsilon(1e-5) <= 3.0


# ---- one example's contribution, float64 ---------------------------------------------------------


def test_one_example_moves_the_released_trajectory_by_what_the_sensitivity_analysis_says():
    """Zero-out neighbours (x against a null example, every other example in its slot), the same
    noise seed, lr = 0 (the model, hence every other example's gradient, stays the same): the
    difference of the released trajectories is x's clipped gradient at x's steps, which are >= b
    apart, and M times it has Frobenius norm sqrt(sum_t ||M[:, t]||^2 ||v_t||^2) <= C sqrt(k)."""
    bands, steps, clip, target = 3, 15, 0.3, 5
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randn(12, 2, generator=g,
                                                                          dtype=torch.float64)
    null_x, null_y = x.clone(), y.clone()
    null_x[target], null_y[target] = 0.0, 0.0  # no bias, so the null example's gradient is 0
    torch.manual_seed(0)
    base = nn.Linear(5, 2, bias=False).double()

    def trajectory(inputs, targets):
        model = snapshot(base)
        engine = dpfused.PrivacyEngine()
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
            data_loader=DataLoader(TensorDataset(inputs, targets), batch_size=3),
            noise_multiplier=1.0, max_grad_norm=clip, loss_reduction="sum",
            sampling="cyclic_poisson", noise=BandMF(bands=bands),
            noise_generator=torch.Generator().manual_seed(7),
            sampling_generator=torch.Generator().manual_seed(8))
        released = []
        while len(released) < steps:
            for xb, yb in loader:
                optimizer.zero_grad()
                if len(xb):
                    ((model(xb) - yb) ** 2).sum().backward()
                optimizer.step()
                released.append(model.weight.grad.detach().flatten().clone())
                if len(released) == steps:
                    break
        return torch.stack(released)

    ours = trajectory(x, y)
    null = trajectory(null_x, null_y)
    delta = ours - null  # (T, d): the noise cancels, the same draws in both runs
    # x's clipped gradient, from the float64 oracle
    grads = per_example_grads(base, lambda call, b: ((call(b[0]) - b[1]) ** 2).sum(), (x, y))
    v = clipped_sums({n: t[target : target + 1] for n, t in grads.items()}, [list(grads)],
                     threshold_of=lambda _: clip)["weight"].flatten()
    steps_of_x = [t for t in range(steps) if float(delta[t].abs().max()) > 0]
    assert len(steps_of_x) >= 2
    assert all(b - a >= bands for a, b in zip(steps_of_x, steps_of_x[1:]))
    for t in range(steps):
        expected = v if t in steps_of_x else torch.zeros_like(v)
        assert torch.allclose(delta[t], expected, rtol=0, atol=1e-12)
    m = strategy_matrix(BandMF(bands=bands).coefficients, steps)
    moved = m @ delta  # what x changes in M x + Z
    predicted = math.sqrt(sum(float(m[:, t].norm()) ** 2 * float(v.norm()) ** 2
                              for t in steps_of_x))
    assert float(moved.norm()) == pytest.approx(predicted, rel=1e-12)
    assert float(moved.norm()) <= clip * math.sqrt(len(steps_of_x)) * (1 + 1e-12)
    # each step's column block is its own: disjoint rows (steps >= b apart), norm <= C
    for t in steps_of_x:
        rows = (m[:, t] != 0).nonzero().flatten().tolist()
        assert rows == list(range(t, min(t + bands, steps)))
        assert float((m[:, t : t + 1] @ delta[t : t + 1]).norm()) <= clip * (1 + 1e-12)


# ---- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error,match", [
    ({"bands": 0}, ValueError, "bands must be an integer >= 1"),
    ({"bands": 2.0}, ValueError, "bands must be an integer >= 1"),
    ({"bands": True}, ValueError, "bands must be an integer >= 1"),
    ({"bands": 5, "steps": 4}, ValueError, "more than the 4 training steps"),
    ({"bands": 3, "strategy": "optimized"}, ValueError, "needs steps"),
    ({"bands": 3, "strategy": "bls"}, ValueError, "strategy must be one of"),
    ({"bands": 3, "momentum": 0.9}, ValueError, "momentum applies to strategy='optimized'"),
    ({"bands": 3, "strategy": "optimized", "steps": 9, "momentum": 1.0}, ValueError, "momentum"),
])
def test_bad_bandmf_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        BandMF(**kwargs)


def _fresh():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).double()
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("kwargs,match", [
    ({"noise": BandMF(bands=3)}, "sampling='poisson' does not keep"),
    ({"noise": BandMF(bands=3), "sampling": "shuffle"}, "fresh permutation"),
    ({"noise": BandMF(bands=13), "sampling": "cyclic"}, "an epoch has 12 batches"),
    ({"noise": BandMF(bands=13), "sampling": "cyclic_poisson"}, r"q \* b .* > 1"),
    ({"sampling": "cyclic_poisson"}, "takes its number of partitions from noise"),
    ({"noise": "bandmf"}, "noise must be a dpfused.BandMF"),
    ({"noise": BandMF(bands=2), "sampling": "cyclic_poisson",
      "adaptive_clipping": dpfused.AdaptiveClipping(count_noise_std=1.0)}, "adaptive_clipping"),
])
def test_make_private_refuses_what_breaks_the_separation_and_changes_nothing(kwargs, match):
    model, optimizer = _fresh()
    before = [p.detach().clone() for p in model.parameters()]
    engine = dpfused.PrivacyEngine()
    with pytest.raises((ValueError, TypeError), match=match):
        engine.make_private(module=model, optimizer=optimizer,
                            data_loader=DataLoader(_data(), batch_size=4), noise_multiplier=1.0,
                            max_grad_norm=1.0, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert engine.optimizer is None and engine.accountant.steps == 0
    engine.make_private(module=model, optimizer=optimizer,  # nothing was instrumented
                        data_loader=DataLoader(_data(), batch_size=4), noise_multiplier=1.0,
                        max_grad_norm=1.0)


def test_make_private_with_epsilon_refuses_more_bands_than_steps():
    model, optimizer = _fresh()
    with pytest.raises(ValueError, match="more than the 6 training steps"):
        dpfused.PrivacyEngine().make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=DataLoader(_data(), batch_size=4),
            target_epsilon=1.0, target_delta=1e-5, steps=6, max_grad_norm=1.0,
            sampling="cyclic_poisson", noise=BandMF(bands=8))


def test_a_skipped_logical_batch_is_refused_and_changes_nothing():
    engine, model, optimizer, loader = _private_mlp(noise=BandMF(bands=3))
    batches = iter(loader)
    x, y = next(batches)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    next(batches)  # drawn, never stepped
    x, y = next(batches)
    optimizer.zero_grad()
    if len(x):
        F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    history = optimizer.noise_history.state_dict()
    with pytest.raises(ValueError, match="must be stepped, in order"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert engine.accountant.steps == 1
    assert optimizer.noise_history.next_step == history["next_step"]


def test_noise_history_state_refuses_other_coefficients():
    history = NoiseHistory(BandMF(bands=3).coefficients)
    state = history.state_dict()
    other = NoiseHistory(BandMF(bands=4).coefficients)
    with pytest.raises(ValueError, match="coefficients"):
        other.load_state_dict(state, devices={}, shapes={})


# ---- checkpoints --------------------------------------------------------------------------------


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _bandmf_run(noise=None, secure_mode=False):
    noise = noise or BandMF(bands=3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    engine = dpfused.PrivacyEngine(secure_mode=secure_mode)
    seeded = {} if secure_mode else dict(noise_generator=torch.Generator().manual_seed(1),
                                         sampling_generator=torch.Generator().manual_seed(2))
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(), batch_size=4), noise_multiplier=1.0, max_grad_norm=1.0,
        sampling="cyclic_poisson", noise=noise, **seeded)
    return engine, model, optimizer, loader


@pytest.mark.parametrize("distributed", [False, True])
def test_resume_continues_the_correlated_noise_bit_for_bit(tmp_path, distributed):
    """save_checkpoint / load_checkpoint (and the DCP checkpoint, one process): the history is
    saved with the noise stream; 7 + 10 steps equal 17 uninterrupted ones."""
    engine, model, optimizer, loader = _bandmf_run()
    _train(model, optimizer, loader, epochs=2, steps=17)
    uninterrupted = _params(model)
    engine, model, optimizer, loader = _bandmf_run()
    _train(model, optimizer, loader, steps=7)
    state = engine.state_dict()
    assert set(state["noise"]["history"]["past"]) == {"0", "1", "2", "3"}
    save = engine.save_distributed_checkpoint if distributed else engine.save_checkpoint
    load = "load_distributed_checkpoint" if distributed else "load_checkpoint"
    path = str(tmp_path / ("dcp" if distributed else "ckpt.pt"))
    save(path=path, module=model, optimizer=optimizer)
    engine, model, optimizer, loader = _bandmf_run()
    getattr(engine, load)(path=path, module=model, optimizer=optimizer)
    assert optimizer.noise_history.next_step == 7
    _train(model, optimizer, loader, epochs=2, steps=10)
    assert torch.equal(_params(model), uninterrupted)


def test_secure_mode_never_saves_the_history_and_restarts_it():
    engine, model, optimizer, loader = _bandmf_run(secure_mode=True)
    _train(model, optimizer, loader, steps=4)
    assert optimizer.noise_history.nbytes > 0
    state = engine.state_dict()
    assert state["noise"]["kind"] == "secure" and "history" not in state["noise"]
    engine, model, optimizer, loader = _bandmf_run(secure_mode=True)
    with pytest.warns(UserWarning, match="BandMF noise history was not restored"):
        engine.load_state_dict(state)
    assert optimizer.noise_history.next_step is None and optimizer.noise_history.nbytes == 0
    _train(model, optimizer, loader, steps=3)  # the correlation restarts; steps go on
    assert engine.accountant.steps == 7


def test_a_history_of_another_strategy_is_refused_before_anything_changes():
    engine, model, optimizer, loader = _bandmf_run()
    _train(model, optimizer, loader, steps=5)
    state = engine.state_dict()
    other, model, optimizer, loader = _bandmf_run(BandMF(bands=3, strategy="optimized", steps=20))
    with pytest.raises(ValueError, match="coefficients"):
        other.load_state_dict(state)
    assert other.accountant.steps == 0 and loader.step == 0
    plain = dpfused.PrivacyEngine()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 3)).double()
    plain.make_private(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                       data_loader=DataLoader(_data(), batch_size=4), noise_multiplier=1.0,
                       max_grad_norm=1.0, sampling="cyclic_poisson", noise=BandMF(bands=3))
    with pytest.raises(ValueError, match="parameter"):  # another model's history
        plain.load_state_dict(state)
