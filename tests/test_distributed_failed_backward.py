"""FSDP2: a backward that fails half way leaves nothing un-noised readable, nothing behind (§9).

per_layer on Llama (2-rank gloo, float64, noise 0): the blocks' groups complete inside backward and
FSDP reduce-scatters them there; the embedding, last in backward, then fails, by a non-finite
per-example norm (dpfused's error) or by an exception of the user's. Before the fix the blocks'
reduced sums sat in the sharded ``.grad`` and the root's completed sums (lm_head, norm) in the
unsharded parameters the root module exposes, un-noised, until ``zero_grad()``. Now no parameter
holds a gradient, and redoing the batch gives exactly the step of a run that never failed (the
failed pass's partial reductions are not added in).
"""

import pytest
import torch
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from tests.distributed_harness import run_on_ranks
from dpfused.distributed import _fsdp_params_of
from tests import models

WORLD, BATCH = 2, 4


class _UserError(Exception):
    pass


def _poison(kind):
    """Forward hook on the embedding: its output gradient becomes NaN, or raises."""
    def hook(_module, _inputs, output):
        def on_grad(grad):
            if kind == "raise":
                raise _UserError("the user's backward hook failed")
            return grad * float("nan")
        output.register_hook(on_grad)
    return hook


def _gradients_left(model):
    """Names of what holds a gradient: the parameters the model exposes (sharded or, for a unit
    left unsharded by the failure, unsharded) and FSDP's own unsharded gradients."""
    left = [n for n, p in model.named_parameters() if p.grad is not None]
    for fsdp_param in _fsdp_params_of(model):
        unsharded = getattr(fsdp_param, "_unsharded_param", None)
        if unsharded is not None and unsharded.grad is not None:
            left.append(f"unsharded {tuple(unsharded.shape)}")
        if fsdp_param.unsharded_accumulated_grad is not None:
            left.append(f"accumulated {tuple(unsharded.shape)}")
    return left


def _run(fail):
    case = models.llama(BATCH)
    model = case.model
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(TensorDataset(*case.inputs), batch_size=BATCH),
        noise_multiplier=0.0, max_grad_norm=0.05, clipping="per_layer", loss_reduction="sum",
        sampling="cyclic")
    batch = next(iter(loader))
    left = None
    if fail is not None:
        handle = model.model.embed_tokens.register_forward_hook(_poison(fail))
        optimizer.zero_grad()
        with pytest.raises(ValueError if fail == "nan" else _UserError):
            case.batch_loss(model, batch, reduction="sum").backward()
        handle.remove()
        left = _gradients_left(model)
    optimizer.zero_grad()
    case.batch_loss(model, batch, reduction="sum").backward()  # the batch again, cleanly
    optimizer.step()
    return {"left": left, "reduced_after": optimizer.reduction.units_reduced_after_backward,
            "params": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}}


def _clean_and_failed(rank):
    return {fail: _run(fail) for fail in (None, "nan", "raise")}


def test_fsdp2_failed_backward_leaves_no_unnoised_gradient(tmp_path):
    for rank, out in enumerate(run_on_ranks(_clean_and_failed, tmp_path, world=WORLD)):
        clean = out[None]
        assert clean["reduced_after"] == 0  # every group reduced inside backward (the fast path)
        for fail in ("nan", "raise"):
            assert out[fail]["left"] == [], (rank, fail)
            for name, value in clean["params"].items():
                torch.testing.assert_close(out[fail]["params"][name], value, rtol=0, atol=1e-12,
                                           msg=f"rank {rank}, {fail}, {name}")
