"""Opacus 1.6's API surface on dpfused (issue 12 items 2-7): one import changed, same behaviour.

Each message test checks that the error names the fix. Numbers are checked against the installed
Opacus (schedulers, accountants) or the float64 torch.func oracle (per-parameter clipping).
"""

import math

import dp_accounting
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpfused
import dpfused.opacus
from dpfused.opacus import accountants, schedulers
from dpfused.opacus import BatchMemoryManager, ModuleValidator
from dpfused.validate import UnsupportedModuleError
from tests.distributed_harness import process_group
from tests.oracle import expected_for, per_example_grads, snapshot
from tests.test_clipping_oracle import _assert_close, _run


def _dataset(n=40):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def _private(engine=None, model=None, loader=None, **kwargs):
    engine = engine or dpfused.opacus.PrivacyEngine()
    model = model or _model()
    kwargs.setdefault("noise_multiplier", 1.0)
    kwargs.setdefault("max_grad_norm", 1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = engine.make_private(module=model, optimizer=optimizer,
                              data_loader=loader or DataLoader(_dataset(), batch_size=8), **kwargs)
    return (engine, *out)


def _one_step(model, optimizer, loader):
    x, y = next(iter(loader))
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


# ---- item 2: wrap_model, _module, get_compatible_module, ModuleValidator.fix --------------------
def test_wrap_model_true_returns_the_model_and_model_module_unwraps_to_it():
    model = _model()
    keys = list(model.state_dict())
    _, module, optimizer, loader = _private(model=model)
    assert module is model and module._module is model
    assert list(module.state_dict()) == keys and len(list(module.modules())) == 4
    _one_step(module, optimizer, loader)
    dpfused.opacus.PrivacyEngine.detach(module)
    assert "_module" not in module.__dict__


def test_wrap_model_false_returns_hooks_whose_cleanup_detaches():
    model = _model()
    _, hooks, optimizer, loader = _private(model=model, wrap_model=False)
    assert isinstance(hooks, dpfused.opacus.GradSampleHooks) and hooks._module is model
    _one_step(model, optimizer, loader)
    hooks.cleanup()
    assert "forward" not in model[0].__dict__  # the instrumentation is gone


def test_get_compatible_module_and_fix_return_a_fixed_copy():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    fixed = dpfused.opacus.PrivacyEngine.get_compatible_module(model)
    assert fixed is not model and isinstance(fixed[1], nn.GroupNorm)
    assert isinstance(model[1], nn.BatchNorm2d)  # Opacus' fix leaves the original alone
    copy = ModuleValidator.fix(model)
    assert copy is not model and isinstance(copy[1], nn.GroupNorm)
    assert ModuleValidator.fix_in_place(model) is model and isinstance(model[1], nn.GroupNorm)
    linear = nn.Linear(1, 2)
    same = dpfused.opacus.PrivacyEngine.get_compatible_module(linear)
    assert same is not linear and torch.equal(same.weight, linear.weight)


def test_unsupported_module_error_is_a_value_error_naming_the_fix():
    with pytest.raises(UnsupportedModuleError, match="proj_size") as info:
        ModuleValidator.fix_and_validate(nn.LSTM(3, 4, proj_size=2))
    assert isinstance(info.value, ValueError)


def test_make_private_raises_unsupported_module_error_naming_every_module():
    """Opacus' make_private raises UnsupportedModuleError (its test_model_validator on resnet18)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3),
                          nn.BatchNorm2d(4))
    with pytest.raises(UnsupportedModuleError) as info:
        _private(model=model)
    assert isinstance(info.value, ValueError)
    assert [e.split(" (")[0] for e in info.value.errors] == ["module '1'", "module '3'"]
    assert all("dpfused.fix(model) swaps BatchNorm for GroupNorm" in e for e in info.value.errors)


def test_ghost_mode_returns_a_criterion_as_opacus_and_hooks_mode_does_not():
    _, model, optimizer, criterion, loader = _private(grad_sample_mode="ghost")
    assert isinstance(criterion, nn.CrossEntropyLoss)
    dpfused.detach(model)
    out = _private(grad_sample_mode="hooks", criterion=nn.CrossEntropyLoss())
    assert len(out) == 4  # engine + Opacus' three values


def test_expected_batch_size_is_opacus_attribute_and_read_only():
    """Opacus' ddp tutorial and test_noise_level read optimizer.expected_batch_size."""
    _, _, optimizer, _ = _private()  # Poisson, q = 8/40 over 40 examples
    assert optimizer.expected_batch_size == 8
    _, _, optimizer, _ = _private(poisson_sampling=False,
                                  loader=DataLoader(_dataset(), batch_size=10))
    assert optimizer.expected_batch_size == 10
    with pytest.raises(AttributeError):
        optimizer.expected_batch_size = 3


# ---- item 2: sigma and C settable between steps, schedulers, checkpoints ------------------------
def test_changed_sigma_is_what_the_step_adds_and_the_ledger_records():
    engine, model, optimizer, loader = _private(noise_multiplier=1.0, max_grad_norm=2.0)
    _one_step(model, optimizer, loader)
    optimizer.noise_multiplier = 0.5
    assert optimizer.noise_std == pytest.approx(1.0)
    _one_step(model, optimizer, loader)
    sigmas = [entry.sampled.noise_multiplier for entry in engine.accountant.entries]
    assert sigmas == [1.0, 0.5]
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number >= 0"):
        optimizer.noise_multiplier = -1.0


def test_budget_check_uses_the_new_sigma():
    engine = dpfused.opacus.PrivacyEngine()
    _, model, optimizer, loader = _private(engine, max_epsilon=50.0, delta=1e-5)
    _one_step(model, optimizer, loader)
    optimizer.noise_multiplier = 0.0  # one step at sigma 0 has infinite epsilon
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(dpfused.PrivacyBudgetExhausted):
        _one_step(model, optimizer, loader)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_max_grad_norm_rescales_every_group_threshold_and_is_refused_mid_step():
    _, model, optimizer, loader = _private(clipping="per_layer", max_grad_norm=2.0)
    assert optimizer.max_grad_norm == pytest.approx(2.0)
    optimizer.max_grad_norm = 1.0
    thresholds = [g.threshold for g in optimizer.instrumentation.groups]
    assert thresholds == pytest.approx([1 / math.sqrt(2)] * 2)
    assert optimizer.noise_std == pytest.approx(optimizer.noise_multiplier * 1.0)
    x, y = next(iter(loader))
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="after loss.backward.*right after optimizer.step"):
        optimizer.max_grad_norm = 3.0
    optimizer.step()
    optimizer.max_grad_norm = 3.0  # between steps: fine
    assert optimizer.max_grad_norm == pytest.approx(3.0)


class _Holder:
    def __init__(self):
        self.noise_multiplier = 2.0
        self.max_grad_norm = 3.0


@pytest.mark.parametrize("name,kwargs", [
    ("StepNoise", dict(step_size=2, gamma=0.5)), ("ExponentialNoise", dict(gamma=0.9)),
    ("LambdaNoise", dict(noise_lambda=lambda e: 1 + e)),
    ("StepGradClip", dict(step_size=3, gamma=0.5)), ("ExponentialGradClip", dict(gamma=0.8)),
    ("LambdaGradClip", dict(scheduler_function=lambda e: 1 / (1 + e))),
])
def test_schedulers_follow_opacus_exactly(name, kwargs):
    import opacus.schedulers
    ours, theirs = _Holder(), _Holder()
    a = getattr(schedulers, name)(ours, **kwargs)
    b = getattr(opacus.schedulers, name)(theirs, **kwargs)
    for _ in range(7):
        a.step()
        b.step()
        assert (ours.noise_multiplier, ours.max_grad_norm) == (
            theirs.noise_multiplier, theirs.max_grad_norm)
    assert a.state_dict().keys() == b.state_dict().keys()


def test_schedulers_are_saved_and_restored_in_checkpoints(tmp_path):
    engine, model, optimizer, loader = _private(dpfused.opacus.PrivacyEngine(accountant="rdp"))
    noise = schedulers.StepNoise(optimizer, step_size=1, gamma=0.5)
    clip = schedulers.ExponentialGradClip(optimizer, gamma=0.5)
    for _ in range(2):
        _one_step(model, optimizer, loader)
        noise.step()
        clip.step()
    engine.save_checkpoint(path=tmp_path / "c.pt", module=model, optimizer=optimizer,
                           noise_scheduler=noise, grad_clip_scheduler=clip)
    engine_b, model_b, optimizer_b, _ = _private(dpfused.opacus.PrivacyEngine(accountant="rdp"))
    noise_b = schedulers.StepNoise(optimizer_b, step_size=1, gamma=0.5)
    clip_b = schedulers.ExponentialGradClip(optimizer_b, gamma=0.5)
    with pytest.warns(UserWarning, match=r"restores noise_multiplier=0.25 .* not the 1.0"):
        engine_b.load_checkpoint(path=tmp_path / "c.pt", module=model_b, optimizer=optimizer_b,
                                 noise_scheduler=noise_b, grad_clip_scheduler=clip_b)
    assert noise_b.last_epoch == noise.last_epoch == 2 and clip_b.last_epoch == 2
    assert optimizer_b.noise_multiplier == optimizer.noise_multiplier == 0.25
    assert engine_b.get_epsilon(1e-5) == engine.get_epsilon(1e-5)
    engine.save_checkpoint(path=tmp_path / "d.pt", module=model)
    with pytest.raises(ValueError, match="no 'noise_scheduler_state_dict'"):
        engine_b.load_checkpoint(path=tmp_path / "d.pt", module=model_b, noise_scheduler=noise_b)


# ---- item 3: one threshold per parameter ------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "cnn_groupnorm", "gpt2_tied", "transformer_encoder"])
def test_per_parameter_clipping_matches_the_oracle(name):
    expected, ours, _, inst = _run(name, 3, "per_parameter")
    assert all(len(g.params) == 1 for g in inst.groups)
    _assert_close(expected, ours, name)


def test_opacus_per_parameter_list_is_one_group_per_parameter_in_optimizer_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    reference = snapshot(model)
    params = list(model.parameters())[::-1]  # the optimizer's order decides, as in Opacus
    optimizer = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1)
    norms = [0.3, 0.2, 0.4, 0.1]  # 2.bias, 2.weight, 0.bias, 0.weight
    data = TensorDataset(torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    model, optimizer, loader = dpfused.opacus.PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=6),
        noise_multiplier=0.0, max_grad_norm=norms, clipping="per_layer")
    inst = optimizer.instrumentation
    assert {g.name: g.threshold for g in inst.groups} == {
        "2.bias": 0.3, "2.weight": 0.2, "0.bias": 0.4, "0.weight": 0.1}
    assert optimizer.max_grad_norm == pytest.approx(math.sqrt(sum(c * c for c in norms)))
    x, y = data.tensors
    grads = per_example_grads(
        reference, lambda call, ex: F.cross_entropy(call(ex[0]), ex[1], reduction="sum"), (x, y))
    F.cross_entropy(model(x), y).backward()
    step = inst.book.close()
    expected, names = expected_for(model, inst, grads)
    _assert_close(expected, {names[k]: v for k, v in step.sums.items()}, "mlp")


def test_per_layer_list_of_the_wrong_length_names_both_counts():
    with pytest.raises(ValueError, match="got 3 values for 2 clipping groups.*4 trainable "
                                         "parameters.*one max_grad_norm per parameter"):
        _private(clipping="per_layer", max_grad_norm=[1.0, 1.0, 1.0])


# ---- item 4: FSDP through Opacus' names (issue 21 item 6; two processes: test_opacus_fsdp2.py) --
def test_fsdp_modes_need_a_sharded_model_and_ghost_tp_is_refused():
    with pytest.raises(ValueError, match="ghost_fsdp.*needs a model sharded with FSDP2.*"
                                         "FSDP2Wrapper\\(model\\).*'ghost'"):
        _private(grad_sample_mode="ghost_fsdp")
    with pytest.raises(ValueError, match="ghost_fsdp.*flat clipping in Opacus.*per_layer"):
        _private(grad_sample_mode="ghost_fsdp", clipping="per_layer")
    with pytest.raises(ValueError, match="ghost_tp.*not supported.*FSDP2Wrapper"):
        _private(grad_sample_mode="ghost_tp")


@pytest.fixture
def one_process_group(tmp_path):
    with process_group(tmp_path):
        yield


class _Blocks(nn.Module):
    """A block list, a tied head and an attention layer: what FSDP2Wrapper must keep together."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 6)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6))
                                     for _ in range(2)])
        self.attention = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 7, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.frozen = nn.Linear(6, 6).requires_grad_(False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        x = self.attention(x, x, x, need_weights=False)[0] + self.frozen(x)
        return self.head(x).mean(1)


def test_fsdp2_wrapper_shards_layer_by_layer_as_opacus_then_trains(one_process_group):
    """Opacus' fsdp_example on one process: FSDP2Wrapper, then make_private with ghost_fsdp."""
    from torch.distributed.fsdp import FSDPModule

    from dpfused.opacus import FSDP2Wrapper, PrivacyEngine

    torch.manual_seed(0)
    model = FSDP2Wrapper(_Blocks())
    units = sorted(n or "<root>" for n, m in model.named_modules() if isinstance(m, FSDPModule))
    # Each layer with a rule, and the frozen one; not MHA's out_proj (MHA uses its weight
    # directly) nor the tied embedding and head (their weight stays with the root).
    assert units == ["<root>", "attention", "blocks.0.0", "blocks.0.1", "blocks.1.0",
                     "blocks.1.1", "frozen"]
    data = TensorDataset(torch.randint(0, 7, (16, 3)), torch.randint(0, 7, (16,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, criterion, loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0,
        grad_sample_mode="ghost_fsdp", poisson_sampling=True)
    assert isinstance(criterion, nn.CrossEntropyLoss)
    assert type(optimizer.reduction).__name__ == "FSDP2Reduction"  # dpfused's FSDP2 path
    for ids, target in loader:
        optimizer.zero_grad()
        criterion(model(ids), target).backward()
        optimizer.step()
    assert optimizer.steps_taken == len(loader)
    with pytest.raises(TypeError, match="FSDP2Wrapper got unexpected.*'reshard'"):
        FSDP2Wrapper(nn.Linear(2, 2), reshard=True)


def test_fsdp2_wrapper_takes_opacus_mixed_precision_keywords(one_process_group):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from dpfused.opacus import FSDP2Wrapper

    model = FSDP2Wrapper(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)),
                         mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16),
                         opacus_high_precision_layers=[nn.LayerNorm])
    dtypes = [m._get_fsdp_state()._fsdp_param_group.mp_policy.param_dtype for m in model]
    assert dtypes == [torch.bfloat16, torch.get_default_dtype()]  # as Opacus' wrapper


# ---- item 5: poisson_sampling=False keeps the loader's semantics ------------------------------
def test_unshuffled_loader_becomes_cyclic_in_its_order_and_batch_size():
    data = _dataset(20)
    _, model, optimizer, loader = _private(
        loader=DataLoader(data, batch_size=6), poisson_sampling=False)
    assert (loader.sampling, loader.batch_size, loader.drop_last) == ("cyclic", 6, False)
    batches = [x for x, _ in loader]
    assert [len(x) for x in batches] == [6, 6, 6, 2]  # drop_last=False kept: a short last batch
    assert torch.equal(torch.cat(batches), data.tensors[0])  # the user's order


def test_shuffled_loader_becomes_shuffle_and_keeps_drop_last():
    _, _, _, loader = _private(loader=DataLoader(_dataset(20), batch_size=6, shuffle=True,
                                                 drop_last=True), poisson_sampling=False)
    assert (loader.sampling, loader.batch_size, loader.drop_last) == ("shuffle", 6, True)
    assert [len(x) for x, _ in loader] == [6, 6, 6]


# ---- item 6: messages that name the fix -------------------------------------------------------
# ---- issue 21 item 7: a private loader passed back in (a notebook cell run again) --------------
def _notebook_cells(data_loader, **settings):
    """The model, optimizer and privacy cells of Opacus' text-classification tutorial."""
    from dpfused.opacus import PrivacyEngine

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-8)
    privacy_engine = PrivacyEngine()
    model, optimizer, train_dataloader = privacy_engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=data_loader, target_delta=1e-5,
        target_epsilon=3.0, epochs=2, max_grad_norm=0.1, **settings)
    return model, optimizer, train_dataloader


def _collate(examples):
    x, y = zip(*examples)
    return torch.stack(x), torch.stack(y)


@pytest.mark.parametrize("settings", [{}, {"poisson_sampling": False}])
def test_private_loader_passed_back_is_unwrapped_to_the_original_loader(settings):
    data = _dataset(40)
    train_dataloader = DataLoader(data, batch_size=8, collate_fn=_collate)  # the data cell
    model, optimizer, train_dataloader = _notebook_cells(train_dataloader, **settings)
    first, first_sigma = train_dataloader, optimizer.noise_multiplier
    seen_by_first = []
    first.add_listener(seen_by_first.append)
    # The model and optimizer cells run again; the data cell does not.
    with pytest.warns(UserWarning, match="private DPDataLoader returned by an earlier "
                                         "make_private.*batch_size=8.*not by wrapping it again"):
        model, optimizer, train_dataloader = _notebook_cells(train_dataloader, **settings)
    assert train_dataloader is not first
    assert train_dataloader.dataset is data and train_dataloader.data_loader.dataset is data
    assert train_dataloader.collate_fn.collate_fn is _collate  # the user's, wrapped once
    for name in ("sampling", "sample_rate", "batch_size", "drop_last", "num_samples"):
        assert getattr(train_dataloader, name) == getattr(first, name), name
    assert optimizer.noise_multiplier == first_sigma  # calibrated on the same settings
    for _ in range(2):
        _one_step(model, optimizer, train_dataloader)
    assert seen_by_first == []  # the earlier loader (and its engine) saw none of these batches


def test_unwrapped_poisson_loader_keeps_its_exact_sample_rate():
    loader = DataLoader(_dataset(40), batch_size=8)
    _, _, _, private = _private(loader=loader, sample_rate=0.123)
    with pytest.warns(UserWarning, match="batch_size=5, sample rate 0.123"):
        _, _, _, again = _private(loader=private)
    assert again.sample_rate == 0.123


def test_native_engine_still_refuses_a_private_loader():
    """dpfused.PrivacyEngine keeps its one typed meaning of data_loader; dpfused.opacus unwraps."""
    _, model, _, loader = _private()
    dpfused.detach(model)
    with pytest.raises(TypeError, match="already a private DPDataLoader.*original torch DataLoader"):
        dpfused.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)


# ---- issue 21 item 9: Opacus' LSTM tutorial with torch's own nn.LSTM ---------------------------
class CharNNClassifier(nn.Module):
    """Opacus' name-classifier tutorial model, with torch's nn.LSTM instead of opacus' DPLSTM."""

    def __init__(self, vocab=12, embedding=6, hidden=5, classes=3):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embedding)
        self.lstm = nn.LSTM(embedding, hidden, num_layers=2, batch_first=True, dropout=0.2)
        self.out_layer = nn.Linear(hidden, classes)

    def forward(self, x, hidden=None):
        x = self.embedding(x)
        x, _ = self.lstm(x, hidden)
        return self.out_layer(x[:, -1, :])


def test_opacus_lstm_tutorial_trains_torch_lstm_as_it_is():
    from dpfused.opacus import PrivacyEngine

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randint(0, 12, (32, 7), generator=g),
                         torch.randint(0, 3, (32,), generator=g))
    model = CharNNClassifier()
    keys = list(model.state_dict())
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    privacy_engine = PrivacyEngine()
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=8),
        noise_multiplier=1.1, max_grad_norm=1.0)
    assert type(model.lstm) is nn.LSTM and list(model.state_dict()) == keys
    before = model.lstm.weight_hh_l1.detach().clone()
    model.train()
    for x, y in train_loader:
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
    assert not torch.equal(model.lstm.weight_hh_l1, before)
    assert 0 < privacy_engine.get_epsilon(1e-5) < float("inf")
    plain = CharNNClassifier()  # what the user reloads later: torch's model, same keys
    plain.load_state_dict(model.state_dict())
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(data.tensors[0]), plain(data.tensors[0]))


@pytest.mark.parametrize("with_epsilon", [False, True])
def test_batch_larger_than_the_dataset_names_both_sizes(with_epsilon):
    """Opacus' dcgan example filters MNIST to one digit: a small dataset can fall below one batch."""
    model = _model()
    arguments = dict(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     data_loader=DataLoader(_dataset(40), batch_size=64), max_grad_norm=1.0)
    engine = dpfused.opacus.PrivacyEngine()
    with pytest.raises(ValueError, match=r"batch_size \(64\) is larger than its dataset \(40 "
                                         r"examples\).*batch_size of at most 40"):
        if with_epsilon:
            engine.make_private_with_epsilon(target_epsilon=3.0, target_delta=1e-5, epochs=1,
                                             **arguments)
        else:
            engine.make_private(noise_multiplier=1.0, **arguments)


def test_opacus_make_private_with_epsilon_with_opacus_keywords():
    """The Opacus path through make_private_with_epsilon: its keywords mapped, then calibrated."""
    model = _model()
    engine = dpfused.opacus.PrivacyEngine()
    model, optimizer, criterion, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_dataset(), batch_size=8), target_epsilon=3.0, target_delta=1e-5,
        epochs=2, max_grad_norm=1.0, poisson_sampling=True, grad_sample_mode="ghost",
        criterion=nn.CrossEntropyLoss())
    assert isinstance(criterion, nn.CrossEntropyLoss) and loader.sampling == "poisson"
    for _ in range(2 * len(loader)):
        _one_step(model, optimizer, loader)
    assert engine.get_epsilon(1e-5) <= 3.0


def test_manual_gradient_accumulation_names_batch_memory_manager():
    _, model, optimizer, loader = _private(poisson_sampling=False)
    it = iter(loader)
    optimizer.zero_grad()
    for _ in range(2):
        x, y = next(it)
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="2 logical batches.*max_physical_batch_size=.*"
                                           "BatchMemoryManager"):
        optimizer.step()
    optimizer.zero_grad()  # then the loop can go on, stepping after every batch
    _one_step(model, optimizer, loader)


def test_no_op_mode_says_dpfused_computes_the_norms_itself():
    with pytest.raises(ValueError, match="no_op.*dpfused computes and clips the per-example "
                                         "norms.*that code goes"):
        _private(grad_sample_mode="no_op")


@pytest.mark.parametrize("poisson", [True, False])
def test_len_inside_batch_memory_manager_counts_physical_batches(poisson):
    _, model, optimizer, loader = _private(
        loader=DataLoader(_dataset(40), batch_size=10), poisson_sampling=poisson)
    assert len(loader) == 4
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=3,
                            optimizer=optimizer) as physical:
        assert len(physical) == math.ceil(4 * 10 / 3)  # Opacus' count
        x, y = next(iter(physical))
        assert len(x) <= 3
    assert len(loader) == 4


# ---- item 7: standalone accountants ----------------------------------------------------------
def _opacus_and_ours(name, history):
    import opacus.accountants
    theirs = opacus.accountants.create_accountant(name)
    ours = accountants.create_accountant(name)
    for sigma, q, n in history:
        for _ in range(n):
            ours.step(noise_multiplier=sigma, sample_rate=q)
        theirs.history.append((sigma, q, n))
    return ours, theirs


def test_rdp_accountant_agrees_with_opacus():
    ours, theirs = _opacus_and_ours("rdp", [(1.1, 0.01, 300), (0.8, 0.02, 50)])
    assert ours.history == theirs.history and len(ours) == 2
    # dp_accounting's fractional-order RDP is a little larger than Opacus' (never smaller).
    assert ours.get_epsilon(1e-5) == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-4)
    assert ours.get_epsilon(1e-5) >= theirs.get_epsilon(1e-5)


def test_prv_accountant_agrees_with_opacus_within_its_eps_error():
    ours, theirs = _opacus_and_ours("prv", [(1.0, 0.02, 200)])
    # Opacus returns the upper end of an interval of width <= 2 eps_error around the true
    # epsilon; dp_accounting's PLD is an upper bound on a grid 100x finer.
    ours, theirs = ours.get_epsilon(1e-5), theirs.get_epsilon(1e-5)
    assert theirs - 2 * 0.01 <= ours <= theirs + 1e-3


def test_accountant_state_round_trips_and_checks_the_mechanism():
    ours = accountants.RDPAccountant()
    ours.step(noise_multiplier=1.0, sample_rate=0.1)
    state = ours.state_dict()
    other = accountants.RDPAccountant()
    other.load_state_dict(state)
    assert other.history == [(1.0, 0.1, 1)]
    with pytest.raises(ValueError, match="cannot be loaded"):
        accountants.PRVAccountant().load_state_dict(state)


def test_gdp_is_refused_with_the_reason():
    for make in (lambda: accountants.create_accountant("gdp"), accountants.GaussianAccountant):
        with pytest.raises(ValueError, match="central-limit approximation is not an upper bound"):
            make()


def test_get_noise_multiplier_follows_opacus_search():
    from opacus.accountants.utils import get_noise_multiplier as theirs
    kwargs = dict(target_epsilon=4.0, target_delta=1e-5, sample_rate=0.02, epochs=5)
    sigma = accountants.get_noise_multiplier(accountant="rdp", **kwargs)
    assert sigma == pytest.approx(theirs(accountant="rdp", **kwargs), abs=0.01)
    epsilon = accountants.RDPAccountant()
    epsilon.history = [(sigma, 0.02, int(5 / 0.02))]
    assert epsilon.get_epsilon(1e-5) <= 4.0


def test_get_noise_multiplier_matches_calibration_and_opacus():
    from opacus.accountants.utils import get_noise_multiplier as opacus_get_noise_multiplier

    ours = accountants.get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5,
                                            sample_rate=0.01, epochs=2, accountant="rdp",
                                            epsilon_tolerance=0.01)
    theirs = opacus_get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.01,
                                         epochs=2, accountant="rdp", epsilon_tolerance=0.01)
    assert ours == pytest.approx(theirs, rel=0.02)  # both bisect; Opacus to 0.01 in epsilon
    accountant = dpfused.accounting.PrivacyAccountant(mechanism="rdp")
    for _ in range(200):
        accountant.record(dpfused.accounting.SampledStep(
            event=dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(ours)),
            sampling="poisson"))
    assert 1.99 < accountant.get_epsilon(1e-5) <= 2.0
