"""FSDP2 in mixed precision: the clipped sums are never rounded to bf16 before the noise (§9).

The attack (issue 19, item 5): with bf16 compute and the reduce dtype left unset, the clipped sums
were handed to FSDP's reduce-scatter in bf16. A sum over many aligned examples then sits on a
coarse bf16 grid (an ulp of 4 near 514), and one example with a tiny clipped contribution flips
the rounding: the pre-noise sum moves by a whole ulp, far more than max_grad_norm. 2-rank gloo,
noise 0, replace-one neighbours D and D' (the target example replaced by a zero example).
"""

import pytest
import torch
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from tests.distributed_harness import run_on_ranks

WORLD, CLIP, TARGET = 2, 2.0, 0.031
ALIGNED = 514  # examples with gradient [1, 0] on rank 1: 514 is a bf16 tie (ulp 4)


def _dataset(with_target):
    """Rank 0's examples (even positions: each rank keeps batch[rank::2]): zeros; rank 1's:
    ALIGNED examples of gradient norm 1 < C (clip factor 1), then the target (x = TARGET) or a
    zero example."""
    x = torch.zeros(2 * (ALIGNED + 1), 2)
    x[1::2, 0] = 1.0
    x[-1, 0] = TARGET if with_target else 0.0
    return TensorDataset(x)


def _step(with_target, clipping, mp_policy):
    torch.manual_seed(0)
    model = fully_shard(nn.Linear(2, 2, bias=False), mp_policy=mp_policy)
    data = _dataset(with_target)
    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(data, batch_size=len(data)), noise_multiplier=0.0,
        max_grad_norm=CLIP, clipping=clipping, loss_reduction="sum", sampling="cyclic")
    (x,) = next(iter(loader))
    optimizer.zero_grad()
    model(x)[:, 0].sum().backward()  # each example's gradient of the weight: row 0 = x
    optimizer.step()
    return model.weight.full_tensor().detach().clone()


def _refusals():
    """Configurations whose sums FSDP would round before the noise are refused, fix named."""
    fix = r"MixedPrecisionPolicy\(param_dtype=torch.bfloat16, reduce_dtype=torch.float32\)"
    for model in (fully_shard(nn.Linear(2, 2).bfloat16()),
                  fully_shard(nn.Linear(2, 2), mp_policy=MixedPrecisionPolicy(
                      param_dtype=torch.bfloat16, reduce_dtype=torch.float16))):
        with pytest.raises(ValueError, match=r"rounding the sum over the batch.*" + fix):
            dpfused.PrivacyEngine().make_private(
                module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                data_loader=DataLoader(_dataset(True), batch_size=8), noise_multiplier=1.0,
                max_grad_norm=CLIP)


def _steps_and_refusals(rank):
    out = {}
    for clipping in ("flat", "per_layer"):
        for name, policy in (("default reduce", MixedPrecisionPolicy(
                param_dtype=torch.bfloat16)), ("bf16 reduce clamped", MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16))):
            out[clipping, name] = [_step(t, clipping, policy) for t in (True, False)]
    _refusals()
    return out


def test_fsdp2_bf16_compute_does_not_round_the_clipped_sum_before_the_noise(tmp_path):
    target = torch.tensor(TARGET, dtype=torch.bfloat16).item()  # the input, cast by FSDP
    for out in run_on_ranks(_steps_and_refusals, tmp_path, world=WORLD):
        for config, (with_target, without) in out.items():
            moved = (without - with_target)[0, 0].item()  # SGD, lr 1: the sums' difference
            assert abs(moved) <= CLIP, (config, moved)  # before the fix: 4.0 (one bf16 ulp)
            assert moved == pytest.approx(target, abs=1e-3), config
