"""dpfused's instrumentation survives code that swaps forwards after make_private (issue 21 item 2).

transformers 5.25 loads models with hub kernels on (``from_pretrained(..., use_kernels=None)``) and
runs ``kernels.kernelize`` again at every ``train()`` / ``eval()`` that changes the mode. kernelize
replaces the instance attribute ``forward`` of each layer class marked for hub kernels
(``LlamaRMSNorm``, ...): a hub kernel's forward where one is mapped for the device, otherwise
``del module.forward`` (back to the class's code). That is where dpfused's override lives; on
0c36fdd the next backward failed closed, blaming the user ("a parameter is used outside its
module's forward"). The tests here do both on the CPU: through the real transformers + kernels
path (an in-process kernel mapped for the CPU stands for a hub kernel), and by simulating
kernelize on a plain torch model, which needs neither library.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpfused

VOCAB = 32


# ---- simulated kernelize (no transformers, no kernels) -----------------------------------------
class _Kernel(nn.Module):
    """Stands for a hub kernel's layer: the same function, run by other code."""

    calls = 0

    def forward(self, x):  # bound to the kernelized module, as kernels does
        _Kernel.calls += 1
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


def _kernelize_by_hand(model, *, kernel):
    """What ``kernels.kernelize`` does to each layer it handles (kernels' ``_replace_forward``)."""
    for module in model.modules():
        if isinstance(module, nn.RMSNorm):
            if kernel:
                module.forward = types.MethodType(_Kernel.forward, module)
                module.__dict__["_kernel_repo"] = "in-process"
            else:
                module.__dict__.pop("forward", None)
                module.__dict__.pop("_kernel_repo", None)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8), nn.Tanh(), nn.Linear(8, 3), nn.RMSNorm(3))


def _private_steps(model, *, between_steps=lambda model: None, steps=3):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4 * steps, 6, generator=g),
                         torch.randint(0, 3, (4 * steps,), generator=g))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer, loader = dpfused.PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=4),
        noise_multiplier=1.0, max_grad_norm=0.5, sampling="cyclic",
        noise_generator=torch.Generator().manual_seed(7))
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        between_steps(model)
    return model


def _assert_same_parameters(a, b):
    a, b = dict(a.named_parameters()), dict(b.named_parameters())
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("kernel", [False, True], ids=["forward-deleted", "kernel-forward"])
def test_simulated_kernelize_between_steps_leaves_the_steps_unchanged(kernel):
    reference = _private_steps(_mlp())
    model = _private_steps(_mlp(), between_steps=lambda m: _kernelize_by_hand(m, kernel=kernel))
    _assert_same_parameters(reference, model)


def test_a_hub_kernel_keeps_serving_forwards_without_grad():
    model = _private_steps(_mlp(), between_steps=lambda m: _kernelize_by_hand(m, kernel=True))
    _Kernel.calls = 0
    with torch.no_grad():
        model(torch.randn(2, 6))
    assert _Kernel.calls == 2  # both RMSNorms, through the kernel, not the rule
    dpfused.detach(model)
    assert model[1].forward.__func__ is _Kernel.forward  # detach puts the kernel back
    model(torch.randn(2, 6)).sum().backward()  # an ordinary model again
    assert model[1].weight.grad is not None


def test_a_private_model_that_is_itself_a_stripped_layer_refuses_the_call_once():
    """The override of the module called is resolved before any pre-hook runs: that call would
    bypass the rule, so it is refused; the override is back for the next one."""
    model = nn.RMSNorm(4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = TensorDataset(torch.randn(4, 4))
    model, optimizer, loader = dpfused.PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=4),
        noise_multiplier=1.0, max_grad_norm=1.0, sampling="cyclic")
    del model.forward
    (x,) = next(iter(loader))
    with pytest.raises(RuntimeError, match=r"forward of the private module \(RMSNorm\) was "
                                           r"replaced.*kernelize.*repeat the call"):
        model(x)
    model(x).sum().backward()
    optimizer.step()


def test_another_replacement_of_forward_is_left_alone_and_fails_closed():
    """Only deletions and the kernels library's replacements are undone (both compute the layer's
    own function); a forward the user wrote is theirs, and it bypasses clipping: refused."""
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = TensorDataset(torch.randn(4, 6))
    model, optimizer, loader = dpfused.PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=4),
        noise_multiplier=1.0, max_grad_norm=1.0, sampling="cyclic")
    layer = model[0]
    layer.forward = lambda x: F.linear(x, layer.weight, layer.bias)
    (x,) = next(iter(loader))
    with pytest.raises(ValueError, match="outside its module's forward"):
        model(x).sum().backward()


# ---- the real path: transformers' from_pretrained, train() / eval(), the kernels library ------
def _saved_llama(folder):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _load(folder, **kwargs):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, **kwargs)


def _evaluate_like_the_trainer(model, ids):
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()


def _lm_steps(model, *, between_steps=None, steps=3, train_first=True):
    ids = torch.randint(0, VOCAB, (4 * steps, 6), generator=torch.Generator().manual_seed(1))
    model.train(train_first)  # False: make_private on from_pretrained's eval-mode model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer, loader = dpfused.PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(TensorDataset(ids), batch_size=4),
        noise_multiplier=1.0, max_grad_norm=0.5, sampling="cyclic",
        noise_generator=torch.Generator().manual_seed(7))
    model.train()
    for (x,) in loader:
        optimizer.zero_grad()
        dpfused.per_example_lm_loss(model(input_ids=x).logits, x).backward()
        optimizer.step()
        if between_steps is not None:
            between_steps(model, ids[:2])
    return model


@pytest.mark.parametrize("train_first", [True, False],
                         ids=["train-then-make_private", "make_private-in-eval-mode"])
def test_from_pretrained_model_trains_across_eval_and_train_as_without_hub_kernels(tmp_path,
                                                                                  train_first):
    """The 10-line loop: from_pretrained (eval mode, hub kernels on), make_private, and an
    evaluation (eval(), a forward, train()) between private steps. 0c36fdd: the backward after
    the first evaluation failed (and make_private refused the eval-mode model). Reference: the
    same steps on the same weights loaded with use_kernels=False, never toggled."""
    folder = _saved_llama(tmp_path / "llama")
    reference = _lm_steps(_load(folder, use_kernels=False))
    model = _load(folder)
    if pytest.importorskip("transformers").utils.is_kernels_available():
        assert model.use_kernels and not model.training  # what from_pretrained gives users
    model = _lm_steps(model, between_steps=_evaluate_like_the_trainer, train_first=train_first)
    _assert_same_parameters(reference, model)


class _CPURMSNormKernel(nn.Module):
    """An in-process stand-in for a hub RMSNorm kernel (kernels only accepts stateless layers
    whose forward has the replaced one's signature)."""

    def forward(self, hidden_states):
        _CPURMSNormKernel.calls = getattr(_CPURMSNormKernel, "calls", 0) + 1
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        normed = hidden_states.to(torch.float32) * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * normed.to(hidden_states.dtype)


class _InProcessRepository:
    """A kernels repository (``load`` returns the layer) that needs no Hub and no build."""

    layer_name = "CPURMSNorm"

    def load(self):
        return _CPURMSNormKernel


def test_a_hub_kernel_mapped_for_the_device_replaces_forward_and_the_steps_stay_the_same(tmp_path):
    """Where a kernel exists for the device (on GPUs: LigerRMSNorm), kernelize sets its forward on
    the instance instead of deleting the override. Training still runs the rule; evaluation runs
    the kernel."""
    kernels = pytest.importorskip("kernels")
    transformers = pytest.importorskip("transformers")
    if not transformers.utils.is_kernels_available():
        pytest.skip("transformers does not use this kernels version")
    folder = _saved_llama(tmp_path / "llama")
    reference = _lm_steps(_load(folder, use_kernels=False))
    repository = _InProcessRepository()
    mapping = {"RMSNorm": {"cpu": {kernels.Mode.TRAINING: repository,
                                   kernels.Mode.INFERENCE: repository}}}
    with kernels.use_kernel_mapping(mapping):
        model = _load(folder)
        norm = model.model.norm
        assert norm.forward.__func__ is _CPURMSNormKernel.forward  # kernelized by from_pretrained
        model = _lm_steps(model, between_steps=_evaluate_like_the_trainer)
        _assert_same_parameters(reference, model)
        _CPURMSNormKernel.calls = 0
        model.eval()
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 3, dtype=torch.long))
        assert _CPURMSNormKernel.calls == 5  # 2 per decoder layer and the final norm
        dpfused.detach(model)
        assert norm.forward.__func__ is _CPURMSNormKernel.forward


def test_dptrainer_with_evaluation_between_steps_on_a_from_pretrained_model(tmp_path):
    """The Trainer's evaluation calls model.eval() then model.train(): the client that failed."""
    pytest.importorskip("peft")  # tests.test_hf needs it
    from dpfused.hf import DPTrainer, PrivacyArguments
    from tests.test_hf import TokenBlocks, hand_written_loop, sgd, training_args
    from tests.test_hf import VOCAB as HF_VOCAB

    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=HF_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    torch.manual_seed(0)
    folder = tmp_path / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    dataset = TokenBlocks()
    reference, _, _ = hand_written_loop(_load(folder, use_kernels=False), dataset, steps=3)
    model = _load(folder)
    trainer = DPTrainer(
        model=model, args=training_args(tmp_path / "out", eval_strategy="steps", eval_steps=1),
        train_dataset=dataset, eval_dataset=TokenBlocks(n=4, seed=1),
        optimizers=(sgd(model), None),
        privacy=PrivacyArguments(noise_multiplier=1.0, per_sample_max_grad_norm=0.1, privacy_seed=7,
                                 accountant="rdp"))
    trainer.train()
    assert trainer.state.global_step == 3
    assert sum("eval_loss" in entry for entry in trainer.state.log_history) == 3
    _assert_same_parameters(reference, trainer.model)
