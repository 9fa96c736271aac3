"""The container rule (a module owning trainable parameters directly AND having trainable children)
against the float64 torch.func oracle, in flat and per_layer clipping.

The models: Opacus' test model ``ModelWithCustomLinear`` (a container whose children are a module
without a rule and another container), a ViT-like embedding (class token and position table next
to a patch projection), and a direct parameter handed to a child as an argument; each behind a
ruled layer, so the input gradient the container passes back is checked too.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from dpfused.instrument import detach, explain, instrument
from tests.oracle import assert_sums_close, expected_for, per_example_grads, snapshot
from tests.rules.harness import half_square, released_matches_oracle, OneLayer, TOLERANCE

DIM = 4


class CustomLinearModule(nn.Module):
    """Opacus' tests/utils.py: a module without a rule (the torch.func fallback's)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self._weight = nn.Parameter(torch.randn(n_out, n_in))
        self._bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        return F.linear(x, self._weight, self._bias)


class LinearWithExtraParam(nn.Module):
    """Opacus' tests/utils.py: an nn.Linear child and a direct parameter after it."""

    def __init__(self, n_in, n_out, hidden=8):
        super().__init__()
        self.fc = nn.Linear(n_in, hidden)
        self.extra_param = nn.Parameter(torch.randn(hidden, n_out))

    def forward(self, x):
        return self.fc(x).matmul(self.extra_param)


class ModelWithCustomLinear(nn.Module):
    """Opacus' privacy_engine_test.py model: containers nested in a container."""

    def __init__(self):
        super().__init__()
        self.fc1 = CustomLinearModule(DIM, 8)
        self.fc2 = LinearWithExtraParam(8, DIM)
        self.extra_param = nn.Parameter(torch.randn(DIM, DIM))

    def forward(self, x):
        return self.fc2(self.fc1(x)).matmul(self.extra_param)


class PatchEmbedding(nn.Module):
    """ViT-like: class token and position table around a projection child, used before it."""

    def __init__(self, steps=3):
        super().__init__()
        self.proj = nn.Linear(DIM, DIM)
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.position = nn.Parameter(torch.randn(1, steps + 1, DIM))

    def forward(self, x):
        tokens = self.proj(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.tanh(torch.cat([cls, tokens], dim=1) + self.position)


class Gain(nn.Module):
    """A child taking its parent's parameter as an argument."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(DIM))

    def forward(self, x, gain):
        return x * gain + self.bias


class PassesParameter(nn.Module):
    """gain's first dimension is DIM = 4: with a batch of 4 the child's torch.func rule must
    still pass it whole to every example (it is a parameter), not row i to example i."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(DIM))
        self.inner = Gain()

    def forward(self, x):
        return self.inner(torch.sin(x), self.gain)


MODELS = {
    "custom_linear": (ModelWithCustomLinear, ()),
    "patch_embedding": (PatchEmbedding, (3,)),
    "passes_parameter": (PassesParameter, (3,)),
}


def _model_and_inputs(name, batch, seed=0):
    cls, positions = MODELS[name]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(DIM, DIM), cls()).double()
    x = torch.randn(batch, *positions, DIM, dtype=torch.float64)
    return model, x


def _clipped_sums(model, x, clipping, reduction):
    def example_loss(call, batched):
        return half_square(call(*batched))

    grads = per_example_grads(snapshot(model), example_loss, (x,))
    norms = torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], 1).norm(dim=1)
    inst = instrument(model, clipping=clipping, max_grad_norm=float(norms.median()),
                      thresholds=None, loss_reduction=reduction, batch_first=True)
    try:
        loss = half_square(model(x))
        (loss / x.shape[0] if reduction == "mean" else loss).backward()
        step = inst.book.close()
        expected, names = expected_for(model, inst, grads)
        return expected, {names[key]: value for key, value in step.sums.items()}, explain(model)
    finally:
        detach(model)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_clipped_sums_match_oracle(name, batch, clipping, reduction):
    model, x = _model_and_inputs(name, batch)
    expected, ours, table = _clipped_sums(model, x, clipping, reduction)
    assert_sums_close(expected, ours, TOLERANCE)
    assert "container" in table


def test_nested_containers_each_get_the_rule():
    model, x = _model_and_inputs("custom_linear", 3)
    _, _, table = _clipped_sums(model, x, "per_layer", "sum")
    rules = {row.split()[0]: row.split()[1] for row in table.splitlines()[2:]}
    assert rules == {"0": "linear", "1": "container", "1.fc1": "functorch",
                     "1.fc2": "container", "1.fc2.fc": "linear"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_input_gradient_and_output_unchanged(name):
    """The direct parameters are detached in the forward: the output and the input gradient
    must still be the plain model's."""
    model, x = _model_and_inputs(name, 3)
    plain = snapshot(model)
    x_plain, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_plain = plain(x_plain)
    half_square(out_plain).backward()
    instrument(model, clipping="flat", max_grad_norm=1.0, thresholds=None,
               loss_reduction="sum", batch_first=True)
    try:
        out = model(x_ours)
        assert torch.equal(out, out_plain)
        half_square(out).backward()
        assert torch.allclose(x_ours.grad, x_plain.grad, rtol=1e-12, atol=0)
    finally:
        detach(model)


def test_released_gradient_through_make_private():
    torch.manual_seed(0)
    model = OneLayer(ModelWithCustomLinear()).double()
    released_matches_oracle(model, (torch.randn(5, DIM, dtype=torch.float64),), clipping="flat")


def _make_private(model):
    return dpfused.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(torch.randn(8, DIM)), batch_size=4),
        noise_multiplier=1.0, max_grad_norm=1.0)


class WithDropout(LinearWithExtraParam):
    def __init__(self):
        super().__init__(DIM, DIM)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(self.fc(x)).matmul(self.extra_param)


def test_dropout_inside_a_container_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"module '<root>' \(WithDropout\).*'drop' \(Dropout, "
                                         r"p=0.1\).*p=0"):
        _make_private(WithDropout())


def test_dropout_with_p_zero_is_accepted():
    model = WithDropout()
    model.drop.p = 0.0
    _make_private(model)


class ReturnsTuple(LinearWithExtraParam):
    def __init__(self):
        super().__init__(DIM, DIM)

    def forward(self, x):
        return self.fc(x).matmul(self.extra_param), x


def test_tuple_output_is_refused_naming_the_module():
    model, _, _ = _make_private(ReturnsTuple())
    with pytest.raises(TypeError, match="ReturnsTuple owns trainable parameters directly "
                                        r"\(extra_param\) and returned tuple"):
        model(torch.randn(2, DIM))


class FunctionalDropout(LinearWithExtraParam):
    def __init__(self):
        super().__init__(DIM, DIM)

    def forward(self, x):
        return F.dropout(self.fc(x), 0.5, training=True).matmul(self.extra_param)


def test_random_numbers_drawn_in_the_forward_fail_loudly_naming_the_module():
    """Functional dropout is not visible to check(): the per-example re-run refuses to draw."""
    model, _, _ = _make_private(FunctionalDropout())
    with pytest.raises(RuntimeError, match="parameters extra_param that FunctionalDropout owns "
                                           "directly.*must not draw random numbers"):
        model(torch.randn(2, DIM)).sum().backward()


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_huggingface_vit_embeddings_match_oracle(clipping):
    """HuggingFace's ViTEmbeddings: class token and position table around the patch convolution
    (its dropout has p=0 by default). Errors are relative to the whole released gradient: the
    key projection's bias has a zero gradient (softmax ignores it), so its own relative error is
    rounding noise over rounding noise."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=8,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=16, num_labels=3)
    model = transformers.ViTForImageClassification(config).double().train()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])

    def loss(logits, labels):
        return F.cross_entropy(logits, labels, reduction="sum")

    grads = per_example_grads(snapshot(model), lambda call, b: loss(call(b[0]).logits, b[1]), (x, y))
    norms = torch.cat([g.reshape(3, -1) for g in grads.values()], 1).norm(dim=1)
    inst = instrument(model, clipping=clipping, max_grad_norm=float(norms.median()),
                      thresholds=None, loss_reduction="sum", batch_first=True)
    try:
        loss(model(x).logits, y).backward()
        step = inst.book.close()
        expected, names = expected_for(model, inst, grads)
        ours = {names[key]: value for key, value in step.sums.items()}
        rules = {row.split()[0]: row.split()[1] for row in explain(model).splitlines()[2:]}
        assert rules["vit.embeddings"] == "container"
    finally:
        detach(model)
    assert set(ours) == set(expected)
    scale = torch.cat([e.flatten() for e in expected.values()]).norm()
    for name, value in expected.items():
        assert (ours[name] - value).norm() / scale < TOLERANCE, name
