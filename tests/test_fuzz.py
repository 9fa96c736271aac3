"""Bad input, fuzzed (issue 13 item 3).

Hypothesis drives ``make_private``, ``make_private_with_epsilon``, ``privacy_report`` and
``optimizer.step`` with one wrong argument at a time (wrong types, negative, NaN, inf, empty, bools
where numbers go, strings, mismatched loaders, wrong modules/optimizers) on top of randomly chosen
valid settings. Each call must fail with a ValueError/TypeError whose message names the argument,
and leave the model (parameters, forwards not instrumented, no hooks), the optimizer (state,
param_groups), the accountant (ledger) and the sampler (position, generator state) exactly as they
were. ``optimizer.step`` misuse that is an order-of-calls error (a batch not drawn by the private
loader, examples missing from the backward) is a RuntimeError naming what went wrong, as the rest
of dpfused's step errors are; its state checks are the same.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import dpfused
from dpfused.instrument import _ACTIVE

NAN, INF = float("nan"), float("inf")
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


class _Stream(IterableDataset):
    def __iter__(self):
        return iter([(torch.zeros(4), 0)])


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def _dataset(n=8):
    return TensorDataset(torch.randn(n, 4), torch.zeros(n, dtype=torch.long))


def _loader(n=8, batch_size=4):
    return DataLoader(_dataset(n), batch_size=batch_size)


# ---- the bad values, per argument ------------------------------------------------------------
# Each entry: argument -> values that must be refused. A callable value is built per example from
# (model, optimizer) so it can refer to them; "_" names are not arguments but whole-call variants.
NUMBERS_THAT_ARE_NOT = [True, False, "1.0", None, [1.0], {"value": 1.0}, 1j, torch.tensor(1.0)]

MAKE_PRIVATE_BAD = {
    "noise_multiplier": [-1.0, -1e-12, NAN, INF, -INF, *NUMBERS_THAT_ARE_NOT],
    "max_grad_norm": [0.0, -1.0, NAN, INF, *NUMBERS_THAT_ARE_NOT],
    "clipping": ["per_sample", "", None, 1, ["flat"], "FLAT"],
    "loss_reduction": ["avg", "", None, 0, ["mean"]],
    "sampling": ["uniform", "", None, 1, ["poisson"]],
    "sample_rate": [0.0, -0.1, 1.5, NAN, INF, True, "0.5", [0.5]],
    "thresholds": [[-0.6, 0.8], [NAN, 1.0], [0.6, INF], ["0.6", "0.8"], [1.0], [1.0, 0.0, 0.0],
                   [], {}, {"0": 0.6, "nope": 0.8}, 1.0, "0.6,0.8", True],
    "adaptive_clipping": ["yes", 0.5, True, {"target_quantile": 0.5}],
    "batch_first": ["yes", 2, None, 1.0],
    "max_physical_batch_size": [0, -1, 2.5, True, "2", NAN],
    "shuffle_once": ["no", 2, None],
    "drop_last": ["no", 2, None],
    "noise_generator": ["seed", 3, torch.zeros(3), lambda m, o: o],
    "sampling_generator": ["seed", 3, torch.zeros(3), lambda m, o: m],
    "max_epsilon": [0.0, -1.0, NAN, "1", True, [1.0]],
    "delta": [0.0, 1.0, -1e-5, NAN, "1e-5", True, [1e-5]],
    "nonfinite_gradients": ["skip", None, True, ""],
    "module": ["model", None, 3, torch.zeros(3),
               lambda m, o: nn.Sequential(nn.Conv1d(4, 4, 1),
                                          nn.BatchNorm1d(4, track_running_stats=False).eval()),
               lambda m, o: nn.Sequential(nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4)),
               lambda m, o: nn.ReLU(), lambda m, o: [m]],
    "optimizer": ["sgd", None, lambda m, o: list(m.parameters()),
                  lambda m, o: torch.optim.SGD(_model().parameters(), lr=0.1),
                  lambda m, o: torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1),
                  lambda m, o: torch.optim.SGD, lambda m, o: m],
    "data_loader": ["loader", None, lambda m, o: list(_loader()), lambda m, o: _dataset(),
                    lambda m, o: DataLoader(_Stream(), batch_size=1),
                    lambda m, o: DataLoader(_dataset(0), batch_size=4),
                    lambda m, o: DataLoader(_dataset(), batch_size=None),
                    lambda m, o: torch.utils.data.DataLoader(_dataset(), batch_size=4).__iter__()],
}
# The partner each argument needs to be meaningful (valid values), and words the message may use.
NEEDS = {"sample_rate": {"sampling": "poisson"},
         "thresholds": {"clipping": "per_layer"},
         "max_epsilon": {"delta": 1e-5}, "delta": {"max_epsilon": 5.0},
         "shuffle_once": {"sampling": "cyclic"}, "drop_last": {"sampling": "cyclic"}}


def _resolve(value, model, optimizer):
    return value(model, optimizer) if callable(value) and not isinstance(value, type) \
        and getattr(value, "__name__", "") == "<lambda>" else value


# ---- snapshots of everything a failing call must leave alone --------------------------------
def _hooks(module):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
             "forward" in m.__dict__) for m in module.modules()]


def _model_snapshot(module):
    return ([p.detach().clone() for p in module.parameters()],
            [p.requires_grad for p in module.parameters()],
            [None if p.grad is None else p.grad.clone() for p in module.parameters()],
            _hooks(module), module in _ACTIVE, module.training)


def _optimizer_snapshot(optimizer):
    state = copy.deepcopy(optimizer.state_dict())
    groups = [(list(map(id, g["params"])), {k: v for k, v in g.items() if k != "params"})
              for g in optimizer.param_groups]
    return state, groups


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def _assert_message_names(exc, names):
    message = str(exc)
    assert any(name in message for name in names), f"message does not name {names}: {message!r}"


# ---- make_private -----------------------------------------------------------------------------
VALID_SETTINGS = st.fixed_dictionaries({
    "clipping": st.sampled_from(["flat", "per_layer"]),
    "sampling": st.sampled_from(["poisson", "cyclic", "shuffle"]),
    "loss_reduction": st.sampled_from(["mean", "sum"]),
    "noise_multiplier": st.sampled_from([0.0, 0.5, 2]),
    "max_grad_norm": st.sampled_from([0.1, 1.0, 3]),
})


def _bad_case(table):
    return st.sampled_from(sorted(table)).flatmap(
        lambda name: st.tuples(st.just(name), st.sampled_from(table[name])))


def _call_kwargs(settings_, name, value, model, optimizer, loader, generator):
    kwargs = dict(module=model, optimizer=optimizer, data_loader=loader,
                  sampling_generator=generator, **settings_)
    kwargs.update(NEEDS.get(name, {}))
    if name == "thresholds" and isinstance(value, dict) and value:
        kwargs["thresholds"] = value
    kwargs[name] = _resolve(value, model, optimizer)
    if name in ("sampling", "clipping") and "sample_rate" in kwargs:
        kwargs.pop("sample_rate")
    return kwargs


def _assert_failed_cleanly(call, names, *, model, optimizer, engine, generator, loader):
    before = (_model_snapshot(model), _optimizer_snapshot(optimizer),
              engine.accountant.state_dict(), generator.get_state(), loader.batch_size)
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    _assert_message_names(info.value, names)
    after = (_model_snapshot(model), _optimizer_snapshot(optimizer),
             engine.accountant.state_dict(), generator.get_state(), loader.batch_size)
    assert _same(before, after), f"state changed by a failing call ({info.value})"
    assert engine.module is None and engine.optimizer is None and engine.data_loader is None
    return info.value


@FUZZ
@given(settings_=VALID_SETTINGS, case=_bad_case(MAKE_PRIVATE_BAD))
def test_make_private_refuses_bad_arguments_and_changes_nothing(settings_, case):
    name, value = case
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader, generator = _loader(), torch.Generator().manual_seed(1)
    engine = dpfused.PrivacyEngine()
    kwargs = _call_kwargs(settings_, name, value, model, optimizer, loader, generator)
    try:
        _assert_failed_cleanly(lambda: engine.make_private(**kwargs), _names_for(name),
                               model=model, optimizer=optimizer, engine=engine,
                               generator=generator, loader=loader)
    finally:
        if model in _ACTIVE:
            dpfused.detach(model)


def _names_for(name):
    """Words a message about ``name`` may use (a partner-pair message names one of the two)."""
    aliases = {"max_epsilon": ("max_epsilon",), "delta": ("delta",),
               "data_loader": ("data_loader", "dataset", "batch_size")}
    return aliases.get(name, (name,))


def test_unknown_and_positional_arguments_are_type_errors():
    model = _model()
    engine = dpfused.PrivacyEngine()
    with pytest.raises(TypeError, match="max_grad_nrom"):
        engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                            data_loader=_loader(), noise_multiplier=1.0, max_grad_nrom=1.0)
    with pytest.raises(TypeError, match="positional"):
        engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), _loader())
    assert model not in _ACTIVE


def test_an_instrumented_module_or_private_optimizer_cannot_be_made_private_twice():
    model = _model()
    engine = dpfused.PrivacyEngine()
    _, dp_optimizer, dp_loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    try:
        second = dpfused.PrivacyEngine()
        for kwargs, names in [({"optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}, ("module",)),
                              ({"optimizer": dp_optimizer}, ("optimizer",)),
                              ({"data_loader": dp_loader}, ("data_loader",))]:
            kwargs = {"module": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
                      "data_loader": _loader(), **kwargs}
            with pytest.raises((ValueError, TypeError)) as info:
                second.make_private(noise_multiplier=1.0, max_grad_norm=1.0, **kwargs)
            _assert_message_names(info.value, names)
            assert second.accountant.steps == 0 and second.module is None
    finally:
        dpfused.detach(model)


# ---- make_private_with_epsilon ---------------------------------------------------------------
WITH_EPSILON_BAD = {
    "target_epsilon": [0.0, -1.0, NAN, INF, "3", True, None, [3.0]],
    "target_delta": [0.0, 1.0, NAN, "1e-5", True, None],
    "epochs": [0, -1, 1.5, NAN, INF, True, "2", [2]],
    "steps": [0, -3, 2.5, NAN, True, "4"],
    "last_iterate": [[1.0], "smooth", 1.0, {"smoothness": -1.0}, {"smoothness": NAN},
                     {"smoothness": "1"}, {"smooth": 1.0}],
    "noise_multiplier": [1.0],
    "module": ["model", None, lambda m, o: [m]],
    "optimizer": ["sgd", None, lambda m, o: list(m.parameters())],
    "data_loader": ["loader", None, lambda m, o: list(_loader()), lambda m, o: _dataset(),
                    lambda m, o: DataLoader(_Stream(), batch_size=1),
                    lambda m, o: DataLoader(_dataset(0), batch_size=4),
                    lambda m, o: DataLoader(_dataset(), batch_size=None)],
    "max_grad_norm": [0.0, NAN, "1"],
    "sampling": ["uniform", None],
}
WITH_EPSILON_NEEDS = {"last_iterate": {"sampling": "cyclic"}, "steps": {"epochs": None}}


@FUZZ
@given(sampling=st.sampled_from(["poisson", "cyclic", "shuffle"]),
       case=_bad_case(WITH_EPSILON_BAD))
def test_make_private_with_epsilon_refuses_bad_arguments_and_changes_nothing(sampling, case):
    name, value = case
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader, generator = _loader(), torch.Generator().manual_seed(1)
    engine = dpfused.PrivacyEngine()
    kwargs = dict(module=model, optimizer=optimizer, data_loader=loader, target_epsilon=3.0,
                  target_delta=1e-5, epochs=2, max_grad_norm=1.0, sampling=sampling,
                  sampling_generator=generator)
    kwargs.update(WITH_EPSILON_NEEDS.get(name, {}))
    kwargs[name] = _resolve(value, model, optimizer)
    names = {"target_delta": ("target_delta", "delta"), "steps": ("steps",),
             "data_loader": ("data_loader", "dataset", "batch_size"),
             "last_iterate": ("last_iterate", "smoothness")}.get(name, (name,))
    try:
        _assert_failed_cleanly(lambda: engine.make_private_with_epsilon(**kwargs), names,
                               model=model, optimizer=optimizer, engine=engine,
                               generator=generator, loader=loader)
    finally:
        if model in _ACTIVE:
            dpfused.detach(model)


# ---- a trained engine: privacy_report and optimizer.step -------------------------------------
class _Run:
    """An engine after two steps, with a backward pass done and the next step not yet taken."""

    def __init__(self, sampling="cyclic"):
        self.model = _model()
        self.sgd = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.engine = dpfused.PrivacyEngine()
        self.noise = torch.Generator().manual_seed(5)
        _, self.optimizer, self.loader = self.engine.make_private(
            module=self.model, optimizer=self.sgd, data_loader=_loader(n=24), noise_multiplier=1.0,
            max_grad_norm=1.0, sampling=sampling, noise_generator=self.noise,
            sampling_generator=torch.Generator().manual_seed(2))
        self.batches = iter(self.loader)
        for _ in range(2):
            self.backward()
            self.optimizer.step()

    def backward(self, x=None, y=None):
        if x is None:
            x, y = next(self.batches)
        self.optimizer.zero_grad()
        F.cross_entropy(self.model(x), y).backward()

    def snapshot(self):
        return (_model_snapshot(self.model), _optimizer_snapshot(self.sgd),
                self.engine.accountant.state_dict(), self.loader.state_dict(),
                self.noise.get_state(), self.optimizer.steps_taken)

    def close(self):
        dpfused.detach(self.model)


@pytest.fixture(scope="module")
def run():
    run = _Run()
    yield run
    run.close()


REPORT_BAD = {
    "delta": [0.0, 1.0, -1e-5, NAN, INF, "1e-5", True, None, [1e-5]],
    "smoothness": [NAN, INF, "1", True, [1.0]],
    "convex": ["yes", 1, None, 0.5],
}


@pytest.mark.parametrize("smoothness", [0.0, -1.0])
def test_privacy_report_says_why_a_smoothness_at_or_below_zero_gives_no_last_iterate_bound(run, smoothness):
    """L <= 0 is outside the last-iterate bound's domain: reported as the reason, as the
    accountant's other refusals are (tests/test_accounting.py), not raised."""
    before = run.snapshot()
    report = run.engine.privacy_report(1e-5, smoothness=smoothness)
    assert report.last_iterate_epsilon is None and report.last_iterate_reason
    assert _same(before, run.snapshot())


@FUZZ
@given(case=_bad_case(REPORT_BAD))
def test_privacy_report_refuses_bad_arguments_and_changes_nothing(run, case):
    name, value = case
    kwargs = {"delta": 1e-5, name: value}
    before = run.snapshot()
    with pytest.raises((ValueError, TypeError)) as info:
        run.engine.privacy_report(**kwargs)
    _assert_message_names(info.value, (name,))
    assert _same(before, run.snapshot())


STEP_BAD = {
    "closure": [3, "loss", torch.zeros(1), [lambda: 0.0]],
    "noise_multiplier": [-1.0, NAN, INF, True, "1.0", None, torch.tensor(1.0)],
}


@FUZZ
@given(case=_bad_case(STEP_BAD))
def test_optimizer_step_refuses_bad_input_and_applies_nothing(run, case):
    name, value = case
    run.backward(*_replay(run))
    before = run.snapshot()
    sigma = run.optimizer.noise_multiplier
    try:
        with pytest.raises((ValueError, TypeError)) as info:
            if name == "closure":
                run.optimizer.step(value)
            else:
                run.optimizer.noise_multiplier = value
                run.optimizer.step()
    finally:
        run.optimizer.noise_multiplier = sigma
    _assert_message_names(info.value, (name,))
    assert _same(before, run.snapshot())
    run.optimizer.step()  # the refused step was not lost: fixed, it goes through
    assert run.optimizer.steps_taken == before[-1] + 1


def _replay(run):
    """A batch of the private loader (replayed: the fixture's sampler must not move between
    examples, so the loader is rewound to where it was after this batch was drawn)."""
    state = run.loader.state_dict()
    batch = next(iter(run.loader))
    run.loader.load_state_dict(state)
    return batch


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(["fewer_examples", "more_examples", "no_backward"]))
def test_optimizer_step_refuses_mismatched_batches_and_applies_nothing(kind):
    run = _Run()
    try:
        x, y = _replay(run)
        if kind == "fewer_examples":
            run.backward(x[:-1], y[:-1])
        elif kind == "more_examples":
            run.backward(torch.cat([x, x[:1]]), torch.cat([y, y[:1]]))
        else:
            run.optimizer.zero_grad()
        before = run.snapshot()
        with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
            run.optimizer.step()
        _assert_message_names(info.value, ("data loader", "examples", "backward"))
        assert _same(before, run.snapshot())
    finally:
        run.close()


def test_a_step_on_a_batch_the_private_loader_did_not_draw_has_no_guarantee():
    """Issue 21.8 changed this contract: such a step runs as Opacus runs it, with a warning, and
    is recorded as a step with no guarantee: epsilon is infinite from then on (it was refused)."""
    run = _Run()
    try:
        _replay(run)
        run.optimizer.instrumentation.book.next_step()  # forget the replayed batch
        run.backward(*next(iter(_loader())))
        with pytest.warns(UserWarning, match="no guarantee|not drawn|did not draw"):
            run.optimizer.step()
        assert run.engine.get_epsilon(1e-5) == float("inf")
    finally:
        run.close()
