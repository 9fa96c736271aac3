"""The engine on the Triton path: every kernel call forced to impl="triton" (the interpreter on CPU,
the real kernels on a GPU), fp32 models, against the float64 torch.func oracle.

The torch twins carry the CPU path and the float64 oracle tests; this checks that the views the
rules hand to the kernels (sliced, transposed, expanded, empty) work on the path GPUs take.
Embeddings run their exact grouped torch form on every device (dpfused/kernels/embedding_norm.py).
"""

import functools

import pytest
import torch

from dpfused import kernels
from dpfused.instrument import detach, instrument
from tests import models
from tests.oracle import expected_for, per_example_grads, snapshot

# The ops the pieces call (the embedding ops are torch on every device: no impl to force).
FORCED = ("ghost_norm_sq_bounded", "ghost_inner_bounded", "direct_norm_sq_bounded",
          "clipped_weight_grad", "norm_layer_backward")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_only(monkeypatch):
    for name in FORCED:
        monkeypatch.setattr(kernels, name, functools.partial(getattr(kernels, name), impl="triton"))


def _to(t, dtype):
    t = t.to(DEVICE)
    return t.to(dtype) if t.is_floating_point() else t


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("name", ["mlp", "sequence_mlp", "cnn_groupnorm", "padded_embedding",
                                  "transformer_encoder", "gpt2_tied", "llama_tied", "gpt2_lora"])
def test_triton_path_matches_oracle(name, clipping, triton_only):
    case = models.FACTORIES[name](3)
    grads = per_example_grads(snapshot(case.model), case.example_loss, case.inputs)  # float64
    model = case.model.float().to(DEVICE)
    inputs = tuple(_to(t, torch.float32) for t in case.inputs)
    inst = instrument(model, clipping=clipping, max_grad_norm=0.5, thresholds=None,
                      loss_reduction="mean", batch_first=True)
    try:
        case.batch_loss(model, inputs, "mean").backward()
        step = inst.book.close()
    finally:
        detach(model)
    expected, names = expected_for(model, inst, grads)
    for key, value in step.sums.items():
        ref = expected[names[key]]
        err = (value.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)
        assert err < 1e-4, f"{names[key]}: relative error {err:.3g} on the Triton path"


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_autocast_bf16(clipping, path, monkeypatch):
    """Under torch.autocast the rules see bf16 output gradients next to fp32 saved inputs."""
    if path == "triton":
        for name in FORCED:
            monkeypatch.setattr(kernels, name,
                                functools.partial(getattr(kernels, name), impl="triton"))
    case = models.gpt2(3)
    grads = per_example_grads(snapshot(case.model), case.example_loss, case.inputs)
    model = case.model.float().to(DEVICE)
    inputs = tuple(_to(t, torch.float32) for t in case.inputs)
    inst = instrument(model, clipping=clipping, max_grad_norm=0.5, thresholds=None,
                      loss_reduction="mean", batch_first=True)
    try:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = case.batch_loss(model, inputs, "mean")
        loss.backward()
        step = inst.book.close()
    finally:
        detach(model)
    expected, names = expected_for(model, inst, grads)
    ours = torch.cat([step.sums[k].double().cpu().flatten() for k in sorted(step.sums)])
    ref = torch.cat([expected[names[k]].flatten() for k in sorted(step.sums)])
    assert (ours - ref).norm() / ref.norm() < 5e-2  # bf16 forward: ~1e-2 relative
