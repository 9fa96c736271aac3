"""Bad input gets a clear error that names the argument or module and the fix (issue 2, item 9)."""

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpfused
import dpfused.opacus
from tests import models
from tests.distributed_harness import process_group


def _loader():
    return DataLoader(TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)), batch_size=4)


def _make(model, optimizer=None, **kwargs):
    kwargs.setdefault("noise_multiplier", 1.0)
    kwargs.setdefault("max_grad_norm", 1.0)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1)
    return dpfused.PrivacyEngine().make_private(module=model, optimizer=optimizer,
                                                data_loader=_loader(), **kwargs)


def _make_opacus(model, **kwargs):
    """Opacus' make_private, through dpfused's compatibility engine (one import changed)."""
    kwargs.setdefault("noise_multiplier", 1.0)
    kwargs.setdefault("max_grad_norm", 1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return dpfused.opacus.PrivacyEngine().make_private(module=model, optimizer=optimizer,
                                                       data_loader=_loader(), **kwargs)


def _cnn_with_batchnorm():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())


def test_batchnorm_is_refused_with_the_fix_named():
    with pytest.raises(ValueError, match=r"module '1' \(BatchNorm2d\) mixes examples.*dpfused.fix"):
        _make(_cnn_with_batchnorm())


def test_fix_swaps_batchnorm_for_groupnorm():
    model = dpfused.fix(_cnn_with_batchnorm())
    assert isinstance(model[1], nn.GroupNorm) and model[1].num_channels == 8
    _make(model)


def test_eval_mode_is_accepted():
    """from_pretrained returns eval mode (issue 21 item 4): what matters is the mode of each
    example-mixing module at every forward, which tests/test_forward_guards.py checks."""
    model = nn.Linear(4, 2).eval()
    _make(model)
    assert not model.training


def test_batchnorm_in_eval_mode_without_running_statistics_is_refused():
    with pytest.raises(ValueError, match=r"module '1' \(BatchNorm2d\) mixes examples.*no running "
                                         r"statistics.*dpfused.fix"):
        _make(nn.Sequential(nn.Conv2d(3, 8, 3),
                            nn.BatchNorm2d(8, track_running_stats=False).eval()))


def test_optimizer_parameter_outside_module_is_refused():
    model, stray = nn.Linear(4, 2), nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD(list(model.parameters()) + [stray], lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[0\].*not in the module"):
        _make(model, optimizer)


def test_recurrent_layer_is_refused_with_the_fix():
    # nn.LSTM / nn.GRU / nn.RNN themselves are clipped as they are (issue 21 item 9).
    with pytest.raises(ValueError, match=r"module 'rnn' \(LSTM\) has proj_size=2"):
        _make(nn.ModuleDict({"rnn": nn.LSTM(4, 4, proj_size=2)}))
    with pytest.raises(ValueError, match=r"module 'cell' \(GRUCell\).*no per-example gradient "
                                         r"rule.*dpfused\.layers\.DPLSTM"):
        _make(nn.ModuleDict({"cell": nn.GRUCell(4, 4)}))


def test_module_with_own_and_child_parameters_refused_only_where_the_container_rule_is_inexact():
    """Such a module gets the container rule (exactness: tests/rules/test_container.py); what
    that rule cannot make exact, a dropout drawn inside it, is refused naming module and fix."""
    class Mixed(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(4))
            self.lin = nn.Linear(4, 2)
            self.drop = nn.Dropout(p)

        def forward(self, x):
            return self.lin(self.drop(x + self.pos))

    with pytest.raises(ValueError, match=r"module '<root>' \(Mixed\) owns trainable parameters "
                                         r"directly \(pos\) and runs 'drop' \(Dropout, p=0.5\)"
                                         r".*p=0, or move the parameters into a leaf module"):
        _make(Mixed(0.5))
    model, _, _ = _make(Mixed(0.0))
    assert "container" in dpfused.explain(model)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_max_grad_norm(value):
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0"):
        _make(nn.Linear(4, 2), max_grad_norm=value)


@pytest.mark.parametrize("value", [-0.5, float("nan")])
def test_bad_noise_multiplier(value):
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number >= 0"):
        _make(nn.Linear(4, 2), noise_multiplier=value)


@pytest.mark.parametrize("name,value", [("clipping", "per_sample"), ("loss_reduction", "avg"),
                                        ("sampling", "uniform")])
def test_bad_choices_list_the_allowed_values(name, value):
    with pytest.raises(ValueError, match=f"{name} must be one of .*, got '{value}'"):
        _make(nn.Linear(4, 2), **{name: value})


def test_embedding_max_norm_is_refused():
    with pytest.raises(ValueError, match="max_norm"):
        _make(nn.Embedding(10, 4, max_norm=1.0))


def test_nothing_is_changed_when_make_private_fails():
    model = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4, proj_size=2))
    with pytest.raises(ValueError):
        _make(model)
    assert "forward" not in model[0].__dict__


def test_opacus_keywords_are_mapped_or_refused():
    module, _, loader = _make_opacus(nn.Linear(4, 2), poisson_sampling=False, grad_sample_mode="hooks")
    assert loader.sampling == "cyclic"  # the loader has shuffle=False: its fixed order (issue 12)
    dpfused.detach(module)
    with pytest.raises(ValueError, match="grad_sample_mode='ghost_fsdp'"):
        _make_opacus(nn.Linear(4, 2), grad_sample_mode="ghost_fsdp")
    with pytest.raises(ValueError, match="secure_mode=True"):
        _make_opacus(nn.Linear(4, 2), secure_mode=True)
    with pytest.raises(ValueError, match="poisson_sampling contradicts"):
        _make_opacus(nn.Linear(4, 2), poisson_sampling=True, sampling="cyclic")
    with pytest.raises(TypeError, match="unexpected keyword"):
        _make_opacus(nn.Linear(4, 2), clip_per_sample=True)
    with pytest.raises(ValueError, match="accountant='gdp'"):
        dpfused.opacus.PrivacyEngine(accountant="gdp")


def test_opacus_criterion_returns_four_values_and_checks_reduction():
    criterion = nn.CrossEntropyLoss()
    model, optimizer, crit, loader = _make_opacus(nn.Linear(4, 2), criterion=criterion,
                                           grad_sample_mode="ghost")
    assert crit is criterion
    dpfused.detach(model)
    with pytest.raises(ValueError, match="reduction='sum'.*loss_reduction='mean'"):
        _make_opacus(nn.Linear(4, 2), criterion=nn.CrossEntropyLoss(reduction="sum"))


def test_per_layer_thresholds_must_match_groups():
    with pytest.raises(ValueError, match="thresholds: got 1 values for 2 clipping groups"):
        _make_opacus(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), clipping="per_layer",
              max_grad_norm=[1.0])


def test_ddp_with_a_static_graph_is_refused_and_a_plain_one_accepted(tmp_path):
    with process_group(tmp_path):
        ddp = nn.parallel.DistributedDataParallel(nn.Linear(4, 2), static_graph=True)
        with pytest.raises(ValueError, match="static_graph=True; dpfused's reduction needs DDP"):
            _make(ddp)
        ddp = nn.parallel.DistributedDataParallel(nn.Linear(4, 2))
        assert _make(ddp)[0] is ddp  # the wrapper is returned; its module is instrumented


# ---- Opacus' ModuleValidator ----------------------------------------------------------------------
def _model_with_every_problem():
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8).eval(),
                         nn.InstanceNorm2d(8, track_running_stats=True), nn.Flatten(),
                         nn.LSTMCell(4, 4))


def test_module_validator_lists_every_problem_and_fix_repairs_the_fixable_ones():
    model = _model_with_every_problem()
    errors = dpfused.opacus.ModuleValidator.validate(model)
    # A BatchNorm in eval mode is listed too: make_private needs train mode, where it mixes examples.
    assert [type(e).__name__ for e in errors] == ["UnsupportedModuleError"] * 3
    assert "BatchNorm2d" in str(errors[0]) and "track_running_stats" in str(errors[1])
    with pytest.raises(ValueError, match=r"(?s)BatchNorm2d.*track_running_stats.*LSTM"):
        dpfused.opacus.ModuleValidator.validate(model, strict=True)
    fixed = dpfused.opacus.ModuleValidator.fix(model)
    assert isinstance(fixed[1], nn.GroupNorm) and not fixed[2].track_running_stats
    assert "running_mean" not in fixed[2].state_dict()
    remaining = dpfused.opacus.ModuleValidator.validate(fixed)
    assert len(remaining) == 1 and "LSTMCell" in str(remaining[0])  # no rule, no fix
    assert not dpfused.opacus.ModuleValidator.is_valid(fixed)
    assert dpfused.opacus.ModuleValidator.is_valid(nn.Linear(2, 2))


def test_module_validator_fix_refuses_opacus_only_options():
    with pytest.raises(TypeError, match="takes no options"):
        dpfused.opacus.ModuleValidator.fix(nn.Linear(2, 2), replace_lstm=True)


def test_grad_scaler_is_refused_and_nothing_is_applied():
    model = nn.Linear(4, 2)
    _, optimizer, loader = _make(model)
    scaler = torch.amp.GradScaler("cpu")
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in loader:
        optimizer.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        with pytest.raises(ValueError, match="GradScaler is not supported.*bfloat16"):
            scaler.step(optimizer)
        break
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("family", ["gpt2_tied", "gpt2_lora"])
def test_huggingface_token_mean_loss_is_refused_while_training(family):
    case = models.FACTORIES[family](2)
    model = case.model
    _make(model, optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                           lr=0.1))
    ids = case.inputs[0]
    with pytest.raises(ValueError, match=r"called with labels=.*per_example_lm_loss"):
        model(input_ids=ids, labels=ids)
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).loss is not None  # evaluation may use it
    dpfused.detach(model)
    assert model(input_ids=ids, labels=ids).loss is not None  # the guard leaves with detach
