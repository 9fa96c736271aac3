"""Every forward of a private model is checked for modules that mix examples (issue 19 item 2), and
make_private accepts a model in eval mode (issue 21 item 4).

make_private checks the model once; ``model.train()`` afterwards (every epoch of the usual loop)
puts a BatchNorm that was in eval mode back on batch statistics. The check must therefore run at
each forward, before anything is computed or updated.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from dpfused.validate import UnsupportedModuleError


def _images(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 2, 5, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


def _cnn(seed=0, bn=None):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(4) if bn is None else bn
    return nn.Sequential(nn.Conv2d(2, 4, 3), bn, nn.ReLU(), nn.Flatten(), nn.Linear(36, 3))


def _private(model, dataset, *, noise=1.0, batch_size=4):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    return dpfused.PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(dataset, batch_size=batch_size),
        noise_multiplier=noise, max_grad_norm=1.0, sampling="cyclic",
        noise_generator=torch.Generator().manual_seed(7))


def _train(model, optimizer, loader, *, before_each_step=lambda: None):
    for x, y in loader:
        before_each_step()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- issue 19 item 2: a BatchNorm put back in training mode ----------------------------------
@pytest.mark.parametrize("affine", [False, True])
def test_batchnorm_back_in_training_mode_is_refused_before_anything_is_released(affine):
    """The attack: make_private with the BatchNorm in eval mode (as make_private's own message
    advised), then the per-epoch model.train(). On 0c36fdd the forward ran on batch statistics:
    the running means were updated from the batch (released without noise) and, without affine
    parameters, the step ran and one example shifted the others' gradients (with them, the
    backward failed, but after the forward had updated the running means)."""
    model = _cnn(bn=nn.BatchNorm2d(4, affine=affine))
    model[1].eval()
    model, optimizer, loader = _private(model, _images())
    model.train()
    before = _state(model)
    x, y = next(iter(loader))
    with pytest.raises(UnsupportedModuleError,
                       match=r"forward of the private model: module '1' \(BatchNorm2d\) mixes "
                             r"examples.*training mode.*running_mean.*dpfused\.fix\(model\).*"
                             r"GroupNorm.*eval mode.*model\.train\(\)"):
        F.cross_entropy(model(x), y).backward()
    _assert_same_state(before, _state(model))  # running statistics and batch count untouched
    assert all(p.grad is None for p in model.parameters())


def test_batchnorm_training_mode_is_refused_without_grad_too_since_it_updates_the_buffers():
    model = _cnn()
    model[1].eval()
    model, _, _ = _private(model, _images())
    model.train()
    before = _state(model)
    with torch.no_grad(), pytest.raises(UnsupportedModuleError, match=r"running_mean"):
        model(torch.randn(4, 2, 5, 5))
    _assert_same_state(before, _state(model))
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 2, 5, 5))  # evaluation: fixed statistics, nothing updated
    _assert_same_state(before, _state(model))


def test_training_goes_on_once_the_batchnorm_is_back_in_eval_mode():
    """After the refusal, bn.eval() after model.train() gives the steps of a model whose
    BatchNorm never left eval mode: the refusal left nothing behind."""
    data = _images()
    reference = _cnn()
    reference[1].eval()
    ref_model, ref_optimizer, ref_loader = _private(reference, data)
    _train(ref_model, ref_optimizer, ref_loader)

    model = _cnn()
    model[1].eval()
    model, optimizer, loader = _private(model, data)
    model.train()
    with pytest.raises(UnsupportedModuleError):
        model(data.tensors[0][:4])
    model[1].eval()
    _train(model, optimizer, loader)
    _assert_same_state(_state(ref_model), _state(model))


def test_batchnorm_without_running_statistics_is_refused_even_in_eval_mode():
    """track_running_stats=False: torch normalizes with the batch's statistics in eval mode too.
    0c36fdd accepted it at make_private because it was in eval mode."""
    model = _cnn(bn=nn.BatchNorm2d(4, track_running_stats=False).eval())
    with pytest.raises(UnsupportedModuleError,
                       match=r"module '1' \(BatchNorm2d\) mixes examples.*no running statistics"
                             r".*even in eval mode.*dpfused\.fix"):
        _private(model, _images())


def test_frozen_recurrent_layer_unfrozen_after_make_private_is_refused_at_the_forward():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 3, batch_first=True).requires_grad_(False)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    data = TensorDataset(torch.randn(8, 4, 3), torch.randint(0, 2, (8,)))
    model, _, loader = _private(Tagger(), data)
    model.rnn.requires_grad_(True)
    with pytest.raises(UnsupportedModuleError, match=r"module 'rnn' \(GRU\).*frozen at "
                                                     r"make_private.*would not be clipped"):
        model(next(iter(loader))[0])


def test_guards_sit_only_on_modules_that_could_mix_examples_and_detach_removes_them():
    """The check costs nothing on models without BatchNorm / InstanceNorm / recurrent layers:
    the only pre-hook is the private module's own (it re-installs stripped forwards)."""
    mlp = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    mlp, _, _ = _private(mlp, TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)))
    assert [len(m._forward_pre_hooks) for m in mlp.modules()] == [1, 0, 0, 0]

    model = _cnn()
    model[1].eval()
    model, _, _ = _private(model, _images())
    assert [len(m._forward_pre_hooks) for m in model.modules()] == [1, 0, 1, 0, 0, 0]
    dpfused.detach(model)
    assert all(not m._forward_pre_hooks and "forward" not in m.__dict__ for m in model.modules())
    model.train()(torch.randn(2, 2, 5, 5)).sum().backward()  # an ordinary model again


# ---- issue 21 item 4: make_private on a model in eval mode ------------------------------------
def _mlp_with_dropout(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(50, 8), nn.Dropout(0.5), nn.ReLU(),
                         nn.Linear(8, 3))


def test_model_in_eval_mode_is_accepted_and_trains_after_model_train():
    """from_pretrained returns a model in eval mode; accelerate / no_trainer users call
    make_private before model.train(). The steps are those of a model made private in train mode
    (dropout included: same masks under the same seed)."""
    data = _images()
    runs = []
    for mode_at_make_private in (True, False):
        model = _mlp_with_dropout().train(mode_at_make_private)
        model, optimizer, loader = _private(model, data)
        model.train()
        torch.manual_seed(3)
        _train(model, optimizer, loader)
        runs.append(_state(model))
    _assert_same_state(*runs)


def test_model_in_eval_mode_with_batchnorm_trains_in_eval_mode():
    """A BatchNorm in eval mode uses fixed statistics: fine, at make_private and at each forward,
    as long as it stays in eval mode."""
    model = _cnn().eval()
    before = _state(model)
    model, optimizer, loader = _private(model, _images())
    _train(model, optimizer, loader)
    after = _state(model)
    assert not torch.equal(before["4.weight"], after["4.weight"])  # it trained
    for buffer in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(before[buffer], after[buffer])


def test_instance_norm_made_to_track_statistics_after_make_private_is_refused():
    """make_private refuses track_running_stats=True; turned on afterwards, the forward refuses
    it too (without grad as well, in training mode: the call would update the buffers)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.InstanceNorm2d(4), nn.Flatten(), nn.Linear(36, 3))
    model, _, _ = _private(model, _images())
    norm = model[1]
    norm.track_running_stats = True
    norm.register_buffer("running_mean", torch.zeros(4))
    norm.register_buffer("running_var", torch.ones(4))
    x = torch.randn(4, 2, 5, 5)
    with pytest.raises(UnsupportedModuleError, match=r"module '1' \(InstanceNorm2d\) has "
                                                     r"track_running_stats=True"):
        model(x)
    with torch.no_grad(), pytest.raises(UnsupportedModuleError, match="track_running_stats"):
        model(x)
    assert torch.equal(norm.running_mean, torch.zeros(4))
