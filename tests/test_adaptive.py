"""Adaptive clipping thresholds (docs/design.md §4): counts, noise, threshold updates and accounting.

The counts are checked against the float64 torch.func oracle's per-example group norms, the count
noise statistically, the threshold update against its formula, and the accounting against a
non-adaptive run at sigma_eff.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpfused
import dpfused.opacus
from dpfused import privacy_math
from dpfused.accounting import LastIterateUnavailable
from dpfused.instrument import instrumentation_of
from tests.oracle import expected_for, per_example_grads, snapshot


def _data(n=24, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g, dtype=torch.float64),
                         torch.randint(0, classes, (n,), generator=g))


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _private(model, *, adaptive, clipping="per_layer", noise=0.0, clip=0.5, batch_size=6,
             dataset=None, engine=None, **kwargs):
    engine = engine or dpfused.PrivacyEngine()
    kwargs.setdefault("sampling", "cyclic")
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(dataset or _data(), batch_size=batch_size),
        noise_multiplier=noise, max_grad_norm=clip, clipping=clipping,
        adaptive_clipping=adaptive, noise_generator=torch.Generator().manual_seed(3), **kwargs)
    return engine, model, optimizer, loader


def _example_loss(call, batched):
    xs, ys = batched
    return F.cross_entropy(call(xs), ys, reduction="sum")


def _oracle_counts(reference, inst, model, x, y):
    """sum_i (1[||G_ig|| <= C_g] - 1/2) per group, from torch.func per-example gradients."""
    grads = per_example_grads(reference, _example_loss, (x, y))
    names = {id(p): n for n, p in model.named_parameters()}
    counts = []
    for group in inst.groups:
        flat = torch.cat([grads[names[id(p)]].reshape(len(x), -1) for p in group.params], dim=1)
        counts.append(((flat.norm(dim=1) <= group.threshold).double() - 0.5).sum())
    return torch.stack(counts), grads


# ---- privacy_math ---------------------------------------------------------------------------
def test_effective_noise_multiplier_composes_two_gaussians():
    sigma, sigma_b, k = 1.1, 3.0, 4
    effective = privacy_math.effective_noise_multiplier(sigma, sigma_b, k)
    # Count sensitivity sqrt(K)/2: the counts alone are a Gaussian with multiplier 2 sigma_b/sqrt(K).
    assert effective == pytest.approx((sigma ** -2 + (2 * sigma_b / math.sqrt(k)) ** -2) ** -0.5)
    assert privacy_math.gradient_noise_multiplier(effective, sigma_b, k) == pytest.approx(sigma)
    assert privacy_math.effective_noise_multiplier(0.0, sigma_b, k) == 0.0


def test_count_noise_too_small_for_the_target_is_refused():
    with pytest.raises(ValueError, match="count_noise_std=0.5 leaves no privacy .* exceed"):
        privacy_math.gradient_noise_multiplier(2.0, 0.5, 4)


def test_group_thresholds_keep_their_total_and_move_toward_the_quantile():
    new = privacy_math.adapted_thresholds([1.0, 1.0, 2.0], [1.0, 0.0, 0.5], target_quantile=0.5,
                                          learning_rate=0.2, total=3.0)
    assert privacy_math.sensitivity(new) == pytest.approx(3.0)
    assert new[0] < new[1]  # all unclipped: shrinks; none unclipped: grows
    assert new[1] / new[0] == pytest.approx(math.exp(0.2))


def test_flat_threshold_moves_and_is_clamped():
    up = privacy_math.adapted_thresholds([1.0], [0.0], target_quantile=0.5, learning_rate=0.2,
                                         total=None)
    assert up == [pytest.approx(math.exp(0.1))]
    clamped = privacy_math.adapted_thresholds([1.0], [0.0], target_quantile=0.5,
                                              learning_rate=5.0, total=None, max_threshold=2.0)
    assert clamped == [2.0]


def test_count_noise_has_std_sigma_b():
    counts = torch.zeros(20000, dtype=torch.float64)
    noisy = privacy_math.noised_counts(counts, std=4.0, generator=torch.Generator().manual_seed(0))
    assert abs(noisy.std().item() / 4.0 - 1) < 0.03
    assert abs(noisy.mean().item()) < 4 * 4.0 / math.sqrt(counts.numel())


# ---- the engine -----------------------------------------------------------------------------
@pytest.mark.parametrize("clipping", ["per_layer", "flat", "per_device"])
def test_counts_match_the_oracle_and_thresholds_follow_the_formula(clipping, monkeypatch):
    seen = []
    real = privacy_math.noised_counts

    def recording(counts, *, std, generator):
        noisy = real(counts, std=std, generator=generator)
        seen.append((counts.clone(), std, noisy.clone()))
        return noisy

    monkeypatch.setattr(privacy_math, "noised_counts", recording)
    model = _mlp()
    reference = snapshot(model)
    adaptive = dpfused.AdaptiveClipping(count_noise_std=0.7, target_quantile=0.4, learning_rate=0.3)
    _, model, optimizer, loader = _private(model, adaptive=adaptive, clipping=clipping,
                                           max_physical_batch_size=4)
    inst = instrumentation_of(model)
    before = [g.threshold for g in inst.groups]
    batch = next(iter(DataLoader(_data(), batch_size=6)))
    expected_counts, _ = _oracle_counts(reference, inst, model, *batch)
    for x, y in loader:  # two physical batches (4 + 2) make one logical step
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if optimizer.steps_taken == 1:
            break
    counts, std, noisy = seen[0]
    torch.testing.assert_close(counts, expected_counts, rtol=0, atol=1e-12)
    assert std == 0.7
    fractions = (noisy / 6 + 0.5).tolist()
    total = None if clipping == "flat" else privacy_math.sensitivity(before)
    expected = privacy_math.adapted_thresholds(before, fractions, target_quantile=0.4,
                                               learning_rate=0.3, total=total)
    assert [g.threshold for g in inst.groups] == pytest.approx(expected, rel=1e-12)


def test_second_step_clips_with_the_adapted_thresholds():
    model = _mlp()
    adaptive = dpfused.AdaptiveClipping(count_noise_std=0.5, learning_rate=1.0)
    _, model, optimizer, loader = _private(model, adaptive=adaptive)
    inst = instrumentation_of(model)
    reference = _mlp()  # uninstrumented: the oracle's copy of the current parameters
    for x, y in loader:
        reference.load_state_dict(model.state_dict())
        thresholds = [g.threshold for g in inst.groups]
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if optimizer.steps_taken == 2:
            break
    assert thresholds != [0.5 / math.sqrt(2)] * 2  # step 1 moved them
    # The oracle reads the thresholds of step 2 from the groups: restore them for the check.
    for group, threshold in zip(inst.groups, thresholds):
        group.threshold = threshold
    grads = per_example_grads(reference, _example_loss, (x, y))
    expected, names = expected_for(model, inst, grads)
    for p in inst.params:
        torch.testing.assert_close(p.grad, expected[names[id(p)]] / 6, rtol=1e-6, atol=1e-12)


def test_flat_norm_converges_to_the_target_quantile_of_the_norms():
    # Loss w.x: example i's gradient is x_i, so the per-example norms are known exactly.
    norms = torch.linspace(1.0, 3.0, 200, dtype=torch.float64)
    x = F.normalize(torch.randn(200, 5, dtype=torch.float64), dim=1) * norms[:, None]
    model = nn.Linear(5, 1, bias=False).double()
    adaptive = dpfused.AdaptiveClipping(count_noise_std=1.0, target_quantile=0.3, learning_rate=0.2)
    _, model, optimizer, loader = _private(
        model, adaptive=adaptive, clipping="flat", clip=0.5, batch_size=50, sampling="shuffle",
        dataset=TensorDataset(x, torch.zeros(200)), loss_reduction="sum",
        sampling_generator=torch.Generator().manual_seed(0))
    inst = instrumentation_of(model)
    for _ in range(60):
        for xb, _ in loader:
            optimizer.zero_grad()
            model(xb).sum().backward()
            optimizer.step()
    assert inst.groups[0].threshold == pytest.approx(torch.quantile(norms, 0.3).item(), rel=0.05)


def test_group_thresholds_give_more_to_the_group_with_larger_gradients():
    model = _mlp()
    with torch.no_grad():
        model[2].weight.mul_(0.01)  # the first layer's gradients (through W2) become tiny
    adaptive = dpfused.AdaptiveClipping(count_noise_std=0.5)
    _, model, optimizer, loader = _private(model, adaptive=adaptive, clip=1.0)
    inst = instrumentation_of(model)
    for _ in range(10):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    thresholds = [g.threshold for g in inst.groups]
    assert privacy_math.sensitivity(thresholds) == pytest.approx(1.0)
    assert thresholds[0] < thresholds[1]


# ---- accounting -----------------------------------------------------------------------------
def _run_steps(engine_kwargs, steps=4, **kwargs):
    engine = dpfused.PrivacyEngine(**engine_kwargs)
    _, model, optimizer, loader = _private(_mlp(), engine=engine, **kwargs)
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if optimizer.steps_taken == steps:
            break
    return engine, optimizer


@pytest.mark.parametrize("sampling", ["poisson", "cyclic"])
def test_accountant_records_sigma_eff(sampling):
    sigma, sigma_b = 1.2, 2.0
    adaptive = dpfused.AdaptiveClipping(count_noise_std=sigma_b)
    engine, optimizer = _run_steps({}, adaptive=adaptive, noise=sigma, sampling=sampling)
    effective = privacy_math.effective_noise_multiplier(sigma, sigma_b, 2)
    assert optimizer.accounted_noise_multiplier == pytest.approx(effective)
    assert [e.sampled.noise_multiplier for e in engine.accountant.entries] == [pytest.approx(effective)] * 4
    plain, _ = _run_steps({}, adaptive=None, noise=effective, sampling=sampling)
    assert engine.get_epsilon(1e-5) == pytest.approx(plain.get_epsilon(1e-5), rel=1e-9)
    assert engine.get_epsilon(1e-5) > _run_steps({}, adaptive=None, noise=sigma,
                                                 sampling=sampling)[0].get_epsilon(1e-5)


def test_last_iterate_is_refused_with_adaptive_thresholds():
    adaptive = dpfused.AdaptiveClipping(count_noise_std=2.0)
    engine, _ = _run_steps({}, adaptive=adaptive, noise=1.0)
    with pytest.raises(LastIterateUnavailable, match="fixed clipping thresholds"):
        engine.accountant.get_last_iterate_epsilon(1e-5, smoothness=1.0)
    report = engine.privacy_report(1e-5, smoothness=1.0)
    assert report.last_iterate_epsilon is None and "fixed clipping thresholds" in str(report)
    assert "noisy per-group counts of unclipped examples" in str(report)


def test_make_private_with_epsilon_calibrates_sigma_eff():
    engine = dpfused.PrivacyEngine()
    model = _mlp()
    adaptive = dpfused.AdaptiveClipping(count_noise_std=3.0)
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(n=60), batch_size=6), target_epsilon=4.0,
        target_delta=1e-5, epochs=2, max_grad_norm=1.0, clipping="per_layer",
        adaptive_clipping=adaptive, sampling="poisson")
    effective = optimizer.accounted_noise_multiplier
    assert optimizer.noise_multiplier > effective
    for _ in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            if len(x):
                F.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert optimizer.steps_taken == 20
    assert 3.8 < engine.get_epsilon(1e-5) <= 4.0 + 1e-6


def test_thresholds_are_saved_and_restored():
    adaptive = dpfused.AdaptiveClipping(count_noise_std=0.5, learning_rate=1.0)
    engine, optimizer = _run_steps({}, adaptive=adaptive)
    state = engine.state_dict()
    moved = [g.threshold for g in optimizer.instrumentation.groups]
    fresh, _, fresh_optimizer, _ = _private(_mlp(), adaptive=adaptive)
    fresh.load_state_dict(state)
    assert [g.threshold for g in fresh_optimizer.instrumentation.groups] == moved


# ---- Opacus' clipping="adaptive" ----------------------------------------------------------------
_OPACUS_ADAPTIVE = dict(target_unclipped_quantile=0.5, clipbound_learning_rate=0.2,
                        max_clipbound=0.6, min_clipbound=0.45, unclipped_num_std=1.0)


def test_opacus_adaptive_keywords_map_to_flat_adaptive_clipping():
    model = _mlp()
    engine = dpfused.opacus.PrivacyEngine()
    with pytest.warns(UserWarning, match="gradient's sigma .* sigma_eff"):
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_data(), batch_size=6), noise_multiplier=1.0,
            max_grad_norm=0.5, clipping="adaptive", poisson_sampling=True, **_OPACUS_ADAPTIVE)
    inst = instrumentation_of(model)
    assert inst.clipping == "flat" and optimizer.adaptive_clipping.max_threshold == 0.6
    for x, y in loader:
        optimizer.zero_grad()
        if len(x):
            F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert 0.45 <= inst.groups[0].threshold <= 0.6


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(clipping="adaptive"), ValueError, r"needs \['target_unclipped_quantile'"),
    (dict(clipping="flat", unclipped_num_std=1.0), ValueError, "configure Opacus' clipping='adaptive'"),
    (dict(clipping="adaptive", adaptive_clipping=dpfused.AdaptiveClipping(count_noise_std=1.0),
          **_OPACUS_ADAPTIVE), ValueError, "not both"),
    (dict(adaptive_clipping=0.5), TypeError, "adaptive_clipping must be a dpfused.AdaptiveClipping"),
    (dict(clipping="per_layer",
          adaptive_clipping=dpfused.AdaptiveClipping(count_noise_std=1.0, max_threshold=2.0)),
     ValueError, "apply to clipping='flat' only"),
])
def test_bad_adaptive_arguments_are_refused_before_anything_changes(kwargs, error, match):
    model = _mlp()
    forward = model[0].forward
    with pytest.raises(error, match=match):
        dpfused.opacus.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_data(), batch_size=6), noise_multiplier=1.0,
            max_grad_norm=0.5, **kwargs)
    assert model[0].forward == forward  # not instrumented


@pytest.mark.parametrize("fields,match", [
    (dict(count_noise_std=0.0), "count_noise_std must be a finite number > 0"),
    (dict(count_noise_std=1.0, target_quantile=1.0), r"target_quantile must be in \(0, 1\)"),
    (dict(count_noise_std=1.0, learning_rate=float("nan")), "learning_rate must be"),
    (dict(count_noise_std=1.0, min_threshold=2.0, max_threshold=1.0), "must be below"),
])
def test_adaptive_clipping_fields_are_checked(fields, match):
    with pytest.raises(ValueError, match=match):
        dpfused.AdaptiveClipping(**fields)


def test_make_private_with_epsilon_refuses_last_iterate_with_adaptive():
    model = _mlp()
    with pytest.raises(ValueError, match="last_iterate calibration needs fixed clipping"):
        dpfused.PrivacyEngine().make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_data(), batch_size=6), target_epsilon=2.0, target_delta=1e-5,
            epochs=1, max_grad_norm=1.0, sampling="cyclic", last_iterate={"smoothness": 1.0},
            adaptive_clipping=dpfused.AdaptiveClipping(count_noise_std=3.0))
