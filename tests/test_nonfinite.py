"""Non-finite per-example gradients: "raise" (default) or "drop" (issue 13 item 4, docs/design.md §4).

"drop" must give exactly the float64 oracle's clipped sum of the other examples, decide per example
(an example's fate and contribution never depend on the other examples), keep B_norm the expected
batch size and say how many examples it dropped; "raise" must leave nothing applied.
"""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from dpfused import privacy_math
from dpfused.instrument import detach, instrument
from tests.oracle import clipped_sums, per_example_grads, snapshot

D, CLASSES, BATCH = 5, 3, 4
POISONS = {"nan_loss": float("nan"), "inf_loss": float("inf")}


def _model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, CLASSES)).double()
    with torch.no_grad():
        model[0].weight[:, 0].abs_()  # an inf in input feature 0 saturates every tanh (see below)
    return model


def _data(seed=1, n=BATCH):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64), torch.randint(0, CLASSES, (n,), generator=g)


def _weighted_loss(model_out, y, weights, reduction):
    """Per-example cross entropy times a per-example weight: a NaN/inf weight poisons one example."""
    per_example = F.cross_entropy(model_out, y, reduction="none") * weights
    return per_example.mean() if reduction == "mean" else per_example.sum()


def _oracle_sums(reference, x, y, keep, threshold_of, groups):
    """The oracle's clipped sums over the examples in ``keep`` only, keyed by parameter name."""
    def example_loss(call, batched):
        xs, ys = batched
        return F.cross_entropy(call(xs), ys, reduction="sum")

    grads = per_example_grads(reference, example_loss, (x[keep], y[keep]))
    return clipped_sums(grads, groups, threshold_of=threshold_of)


def _instrumented_sums(model, x, y, weights, *, clipping, nonfinite, reduction="mean",
                       max_grad_norm=0.7, count_unclipped=False):
    inst = instrument(model, clipping=clipping, max_grad_norm=max_grad_norm, thresholds=None,
                      loss_reduction=reduction, batch_first=True, count_unclipped=count_unclipped,
                      nonfinite=nonfinite)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _weighted_loss(model(x), y, weights, reduction).backward()
        return inst, inst.book.close(), caught
    finally:
        detach(model)


def _named(model, sums):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[k]: v for k, v in sums.items()}


def _groups_of(model, inst):
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g.params] for g in inst.groups]
    thresholds = {tuple(ns): g.threshold for ns, g in zip(groups, inst.groups)}
    return groups, lambda ns: thresholds[tuple(ns)]


def _assert_exact(expected, ours):
    assert set(ours) == set(expected)
    for name, value in expected.items():
        err = (ours[name] - value).norm() / value.norm().clamp_min(1e-30)
        assert err < 1e-9, f"{name}: relative error {err:.3g}"


# ---- "drop" against the float64 oracle ----------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("poison", sorted(POISONS))
def test_drop_gives_the_oracle_sum_of_the_other_examples(poison, clipping, reduction):
    model, (x, y) = _model(), _data()
    reference, bad = snapshot(model), 2
    weights = torch.ones(BATCH, dtype=torch.float64)
    weights[bad] = POISONS[poison]
    inst, step, caught = _instrumented_sums(model, x, y, weights, clipping=clipping,
                                            nonfinite="drop", reduction=reduction)
    keep = torch.arange(BATCH) != bad
    groups, threshold_of = _groups_of(model, inst)
    _assert_exact(_oracle_sums(reference, x, y, keep, threshold_of, groups), _named(model, step.sums))
    assert step.dropped == 1 and step.examples == BATCH  # still counted in the batch
    assert any("non-finite" in str(w.message) or "NaN/inf" in str(w.message) for w in caught)


def test_an_example_non_finite_in_one_group_only_is_dropped_from_every_group():
    """inf in input feature 0: every tanh saturates, so layer 1's gradient is 0 * inf = NaN while
    layer 2's is finite; per_layer clipping must still give the example 0 in layer 2's group."""
    model, (x, y) = _model(), _data()
    reference, bad = snapshot(model), 1
    x = x.clone()
    x[bad, 0] = float("inf")
    weights = torch.ones(BATCH, dtype=torch.float64)
    inst, step, _ = _instrumented_sums(model, x, y, weights, clipping="per_layer",
                                       nonfinite="drop", count_unclipped=True)
    keep = torch.arange(BATCH) != bad
    groups, threshold_of = _groups_of(model, inst)
    _assert_exact(_oracle_sums(reference, x, y, keep, threshold_of, groups), _named(model, step.sums))
    # Layer 2 saw a finite gradient for the bad example; dropped, it counts as clipped (-1/2) there.
    norms_2 = per_example_grads(reference, lambda call, b: F.cross_entropy(call(b[0]), b[1], reduction="sum"),
                                (x[keep], y[keep]))
    kept_norms = torch.cat([norms_2[n].reshape(BATCH - 1, -1) for n in groups[1]], 1).norm(dim=1)
    expected_count = float(((kept_norms <= threshold_of(groups[1])).double() - 0.5).sum()) - 0.5
    assert float(step.unclipped[1]) == expected_count


def test_through_the_engine_the_step_divides_by_the_expected_batch_size_and_counts_drops():
    model = _model()
    reference = snapshot(model)
    x, y = _data(n=8)
    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=BATCH), noise_multiplier=0.0,
        max_grad_norm=0.7, sampling="cyclic", nonfinite_gradients="drop")
    xb, yb = next(iter(loader))
    weights = torch.ones(BATCH, dtype=torch.float64)
    weights[0] = float("nan")
    optimizer.zero_grad()
    with pytest.warns(RuntimeWarning, match="nonfinite_gradients='drop'.*examples_dropped"):
        _weighted_loss(model(xb), yb, weights, "mean").backward()
    optimizer.step()
    keep = torch.arange(BATCH) != 0
    expected = _oracle_sums(reference, xb, yb, keep, lambda _: 0.7,
                            [[n for n, _ in reference.named_parameters()]])
    for name, p in model.named_parameters():
        # lr 1: the update is the released gradient, divided by B_norm = b = 4 (not 3).
        step = dict(reference.named_parameters())[name].detach() - p.detach()
        assert torch.allclose(step, expected[name] / BATCH, rtol=1e-9, atol=1e-12)
    assert optimizer.examples_dropped == 1 and engine.accountant.steps == 1


# ---- the decision is per example --------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(bad=st.lists(st.booleans(), min_size=BATCH, max_size=BATCH),
       poison=st.sampled_from(sorted(POISONS)), clipping=st.sampled_from(["flat", "per_layer"]))
def test_a_batch_sum_is_the_sum_of_each_example_alone(bad, poison, clipping):
    """Each example's contribution, drop decision included, is the same in the batch as alone:
    it depends on that example only (loss_reduction="sum", so B does not enter)."""
    model, (x, y) = _model(), _data()
    weights = torch.tensor([POISONS[poison] if b else 1.0 for b in bad], dtype=torch.float64)
    _, together, _ = _instrumented_sums(model, x, y, weights, clipping=clipping, nonfinite="drop",
                                        reduction="sum")
    alone = {}
    for i in range(BATCH):
        _, one, _ = _instrumented_sums(model, x[i:i + 1], y[i:i + 1], weights[i:i + 1],
                                       clipping=clipping, nonfinite="drop", reduction="sum")
        assert one.dropped == int(bad[i])
        for key, value in one.sums.items():
            alone[key] = alone.get(key, 0) + value
    assert together.dropped == sum(bad)
    for key, value in alone.items():
        assert torch.allclose(together.sums[key], value, rtol=1e-12, atol=1e-15)


@settings(max_examples=50, deadline=None)
@given(norms=st.lists(st.lists(st.sampled_from([0.0, 0.5, 3.0, float("nan"), float("inf")]),
                               min_size=3, max_size=3), min_size=1, max_size=4),
       others=st.lists(st.sampled_from([0.1, 7.0, float("nan"), float("inf")]), min_size=3,
                       max_size=3))
def test_the_decision_for_an_example_reads_only_its_own_norms(norms, others):
    """privacy_math.nonfinite_examples and the multipliers: example 0's entries stay the same
    whatever the other examples' norms are (norms[g] = example 0's squared norm in group g)."""
    def decide(rest):
        per_group = [torch.tensor([n0, *rest], dtype=torch.float64) for n0 in norms_of_0]
        dropped = privacy_math.nonfinite_examples(per_group)
        multipliers = [privacy_math.example_multipliers(n, 1.0, 2.0, dropped=dropped) for n in per_group]
        return bool(dropped[0]), [float(m[0]) for m in multipliers]

    for norms_of_0 in norms:
        reference = decide([0.2, 0.3, 0.4])
        assert decide(others) == reference
        assert reference[0] == any(not torch.isfinite(torch.tensor(n)) for n in norms_of_0)
        if reference[0]:
            assert reference[1] == [0.0] * len(norms_of_0)


# ---- "raise" ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_raise_is_the_default_and_leaves_nothing_applied(clipping):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _data(n=8)
    engine = dpfused.PrivacyEngine()
    sgd = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=sgd, data_loader=DataLoader(TensorDataset(x, y), batch_size=BATCH),
        noise_multiplier=1.0, max_grad_norm=0.7, sampling="cyclic", clipping=clipping)
    xb, yb = next(iter(loader))
    weights = torch.ones(BATCH, dtype=torch.float64)
    weights[3] = float("inf")
    optimizer.zero_grad()
    with pytest.raises(ValueError, match=r"non-finite per-example gradient norm.*examples \[3\]"
                                         r".*nonfinite_gradients='drop'"):
        _weighted_loss(model(xb), yb, weights, "mean").backward()
    with pytest.raises(RuntimeError, match="zero_grad"):
        optimizer.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert engine.accountant.steps == 0 and not sgd.state and optimizer.examples_dropped == 0
    optimizer.zero_grad()  # redo the batch without the poison: a normal step
    _weighted_loss(model(xb), yb, torch.ones(BATCH, dtype=torch.float64), "mean").backward()
    optimizer.step()
    assert engine.accountant.steps == 1


def test_an_unknown_choice_is_refused_with_the_choices():
    model, (x, y) = _model(), _data(n=8)
    with pytest.raises(ValueError,
                       match="nonfinite_gradients must be one of .*'raise'.*'drop'.*got 'skip'"):
        dpfused.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=BATCH), noise_multiplier=1.0,
            max_grad_norm=1.0, nonfinite_gradients="skip")
    assert "forward" not in model[0].__dict__
