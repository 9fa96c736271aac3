"""DistributedDataParallel-wrapped models (gloo, 2 CPU processes, float64), docs/design.md §9.

Noise 0: after two steps every rank holds the parameters of ONE process that clipped the whole
logical batch with the torch.func oracle. One spawn per model runs every configuration (flat and
per_layer, physical batches, activation checkpointing) to keep CI short.
"""

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from tests import models
from tests.distributed_harness import run_on_ranks
from tests.oracle import clipped_sums, per_example_grads

BATCH = 8  # the logical batch: the whole dataset (cyclic sampling), 4 examples per rank
STEPS, LR, CLIP = 2, 0.5, 0.05
CONFIGS = [  # (clipping, max_physical_batch_size, activation checkpointing)
    ("flat", None, False),
    ("per_layer", None, False),
    ("flat", 2, True),
    ("per_layer", 2, False),
    ("per_layer", None, True),
]


def _case(name):
    return {"gpt2": models.gpt2, "llama": models.llama}[name](BATCH)


def _group_names(module, groups):
    names = {id(p): n for n, p in module.named_parameters()}
    return [([names[id(p)] for p in g.params], g.threshold) for g in groups]


def _train_ddp(rank, name, clipping, physical, checkpointing):
    case = _case(name)
    model = case.model
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.002)  # several buckets
    engine = dpfused.PrivacyEngine()
    ddp, optimizer, loader = engine.make_private(
        module=ddp, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        data_loader=DataLoader(TensorDataset(*case.inputs), batch_size=BATCH),
        noise_multiplier=0.0, max_grad_norm=CLIP, clipping=clipping, sampling="cyclic",
        max_physical_batch_size=physical)
    while optimizer.steps_taken < STEPS:
        for batch in loader:
            optimizer.zero_grad()
            case.batch_loss(ddp, batch).backward()
            optimizer.step()
    groups = _group_names(model, optimizer.instrumentation.groups)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "groups": groups, "epsilon": engine.get_epsilon(1e-5),
            "overlapped": optimizer.reduction.buckets_overlapped,
            "deferred": optimizer.reduction.buckets_deferred}


def _every_config(rank, name):
    return [_train_ddp(rank, name, *config) for config in CONFIGS]


def _oracle(name, groups, normalizer=BATCH, case=None):
    """One process, the whole batch: STEPS SGD steps on the oracle's clipped sums / normalizer
    (B for a mean loss, 1 for a summed one); ``case`` default ``_case(name)``."""
    case = case or _case(name)
    model = copy.deepcopy(case.model)
    for _ in range(STEPS):
        grads = per_example_grads(model, case.example_loss, case.inputs)
        thresholds = {tuple(names): c for names, c in groups}
        sums = clipped_sums(grads, [names for names, _ in groups],
                            threshold_of=lambda ns: thresholds[tuple(ns)])
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in sums:  # frozen parameters (LoRA's base) have no gradient
                    p -= LR * sums[n] / normalizer
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_update(initial, ours, expected, name, config):
    """The updates (after - before) agree parameter by parameter, in relative norm: to float64
    rounding, or float32 for Llama (its RMSNorm computes in float32, see test_clipping_oracle)."""
    tolerance = 1e-6 if name == "llama" else 1e-9
    assert set(ours) == set(expected)
    for n, value in expected.items():
        update = value - initial[n].detach()
        err = (ours[n] - initial[n].detach() - update).norm() / update.norm().clamp_min(1e-30)
        assert err < tolerance, f"{config} {n}: relative error {err:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_ddp_two_ranks_equal_one_process_oracle(tmp_path, name):
    ranks = run_on_ranks(_every_config, tmp_path, name)
    initial = dict(_case(name).model.named_parameters())
    for i, config in enumerate(CONFIGS):
        expected = _oracle(name, ranks[0][i]["groups"])
        for ours in ranks:
            assert_same_update(initial, ours[i]["params"], expected, name, config)
        assert ranks[0][i]["epsilon"] == ranks[1][i]["epsilon"]
        clipping, _, checkpointing = config
        if clipping == "flat":  # groups complete at the end of backward: nothing can overlap
            assert ranks[0][i]["overlapped"] == 0 and ranks[0][i]["deferred"] > 0
        elif name == "llama" and not checkpointing:  # every group completes inside backward
            assert ranks[0][i]["overlapped"] > 1 and ranks[0][i]["deferred"] == 0
        elif name == "gpt2" and not checkpointing:  # the tied wte/lm_head group waits
            assert ranks[0][i]["overlapped"] > 0 and ranks[0][i]["deferred"] > 0
