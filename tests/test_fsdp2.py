"""FSDP2-sharded models (fully_shard; gloo, 2 CPU processes), docs/design.md §9.

Noise 0, float64: after two steps every rank's shards put together are the parameters of ONE
process that clipped the whole logical batch with the torch.func oracle, for flat and per_layer,
mean and sum losses, cyclic and shuffle sampling, physical batches, activation checkpointing, tied
weights (GPT-2) and LoRA adapters (GPT-2 + peft). Poisson, in physical batches (some empty): the
same as one dpfused process drawing the same batches, also with adaptive thresholds. bf16 MixedPrecisionPolicy with float32 reduction: the float64 oracle to bf16
accuracy. Noise: with zero gradients each rank's shard carries N(0, (sigma C / B)^2) per
coordinate, from a stream of its own. Collectives: a private step issues exactly the collectives
of a non-private FSDP step (FSDP's all-gathers and one reduce-scatter per unit). One spawn per
model.
"""

import copy
from collections import Counter

import pytest
import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from tests import models
from tests.distributed_harness import WORLD, run_on_ranks
from tests.test_ddp import BATCH, CLIP, LR, STEPS, _group_names, _oracle, assert_same_update

CONFIGS = [  # (clipping, max_physical_batch_size, activation checkpointing, loss_reduction, sampling)
    ("flat", None, False, "mean", "cyclic"),
    ("per_layer", 2, False, "mean", "cyclic"),
    ("per_layer", None, True, "mean", "cyclic"),
    ("per_layer", None, False, "sum", "shuffle"),
    ("flat", 2, False, "sum", "shuffle"),
]
SIGMA = 4.0
COUNT_STD = 2.0  # sigma_b of the adaptive counts' noise check
POISSON_BATCH = 4  # expected logical batch of the Poisson run: sample rate 1/2
FACTORIES = {"gpt2": models.gpt2, "llama": models.llama, "gpt2_lora": models.gpt2_lora}


def _blocks(model):
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def _shard(model, checkpointing=False, mp_policy=None):
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kwargs = {"mp_policy": mp_policy} if mp_policy is not None else {}
    for block in _blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _make_private(case, model, *, noise=0.0, clipping="flat", physical=None,
                  loss_reduction="mean", sampling="cyclic", batch_size=BATCH, adaptive=None):
    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        data_loader=DataLoader(TensorDataset(*case.inputs), batch_size=batch_size),
        noise_multiplier=noise, max_grad_norm=CLIP, clipping=clipping, sampling=sampling,
        loss_reduction=loss_reduction, max_physical_batch_size=physical,
        sampling_generator=torch.Generator().manual_seed(5),
        noise_generator=torch.Generator().manual_seed(3), adaptive_clipping=adaptive)
    return engine, model, optimizer, loader


def _run(case, model, optimizer, loader, loss_reduction="mean", steps=STEPS, zero_loss=False):
    """Train ``steps`` logical steps; returns how many physical batches were padding."""
    padded = 0
    while optimizer.steps_taken < steps:
        for batch in loader:
            padded += loader.current.padding
            optimizer.zero_grad()
            loss = case.batch_loss(model, batch, reduction=loss_reduction)
            (loss * 0 if zero_loss else loss).backward()
            optimizer.step()
            if optimizer.steps_taken == steps:
                break
    return padded


def _full_params(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def _train(name, clipping, physical, checkpointing, loss_reduction, sampling):
    case = FACTORIES[name](BATCH)
    model = _shard(case.model, checkpointing)
    engine, model, optimizer, loader = _make_private(
        case, model, clipping=clipping, physical=physical, loss_reduction=loss_reduction,
        sampling=sampling)
    _run(case, model, optimizer, loader, loss_reduction)
    return {"params": _full_params(model), "epsilon": engine.get_epsilon(1e-5),
            "groups": _group_names(model, optimizer.instrumentation.groups),
            "units_after_backward": optimizer.reduction.units_reduced_after_backward}


def _train_poisson(name, world, adaptive=False):
    """Poisson sampling (sample rate 1/2), noise 0: on ``world`` ranks in physical batches of
    one example (the ranks run as many as the larger share needs: some are padding), or one
    process with whole logical batches. ``adaptive``: adaptive per_layer thresholds, counts
    noised with a negligible std (the ranks' count noises differ from one process's)."""
    case = FACTORIES[name](BATCH)
    model = _shard(case.model) if world > 1 else case.model
    engine, model, optimizer, loader = _make_private(
        case, model, clipping="per_layer", sampling="poisson", batch_size=POISSON_BATCH,
        physical=1 if world > 1 else None,
        adaptive=dpfused.AdaptiveClipping(count_noise_std=1e-9, learning_rate=0.5)
        if adaptive else None)
    padded = _run(case, model, optimizer, loader, steps=3)
    return {"params": _full_params(model), "padded": padded,
            "thresholds": [g.threshold for g in optimizer.instrumentation.groups]}


def _train_mixed_precision(name):
    """bf16 parameters in compute, float32 reduction and master shards."""
    case = FACTORIES[name](BATCH)
    model = _shard(case.model.float(), mp_policy=MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    engine, model, optimizer, loader = _make_private(case, model, clipping="per_layer")
    _run(case, model, optimizer, loader)
    return {"params": _full_params(model),
            "grad_dtypes": {p.grad.dtype for p in model.parameters() if p.grad is not None},
            "groups": _group_names(model, optimizer.instrumentation.groups)}


def _noise(name):
    case = FACTORIES[name](BATCH)
    engine, model, optimizer, loader = _make_private(case, _shard(case.model), noise=SIGMA)
    _run(case, model, optimizer, loader, steps=1, zero_loss=True)
    return {n: p.grad.to_local().clone() for n, p in model.named_parameters() if p.requires_grad}


def _count_noise(name):
    """Adaptive thresholds' noisy counts under FSDP2, for counts of 0: each rank adds its own
    N(0, std^2 / world) before the all-reduce, so the sum must be N(0, std^2), the same on all."""
    case = FACTORIES[name](BATCH)
    _, _, optimizer, _ = _make_private(case, _shard(case.model))
    return optimizer.reduction.noised_global_counts(
        torch.zeros(4000, dtype=torch.float64), std=COUNT_STD, generator=optimizer.generator)


class _CountCollectives(TorchDispatchMode):
    """Counts the c10d collectives issued (every process group op goes through the dispatcher)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            self.counts[func.name().split("::")[-1]] += 1
        return func(*args, **(kwargs or {}))


def _collectives(name, clipping):
    """Collectives of one private step against one non-private FSDP step of the same model."""
    case = FACTORIES[name](BATCH)
    plain = _shard(copy.deepcopy(case.model))
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=LR)
    with _CountCollectives() as baseline:
        case.batch_loss(plain, case.inputs).backward()
        plain_optimizer.step()
    engine, model, optimizer, loader = _make_private(case, _shard(case.model), clipping=clipping)
    batch = next(iter(loader))
    with _CountCollectives() as private:
        case.batch_loss(model, batch).backward()
        optimizer.step()
    return {"baseline": baseline.counts, "private": private.counts,
            "units_after_backward": optimizer.reduction.units_reduced_after_backward}


def _every_run(rank, name):
    out = {"results": [_train(name, *config) for config in CONFIGS],
           "poisson": _train_poisson(name, WORLD)}
    if name == "llama":
        out["adaptive"] = _train_poisson(name, WORLD, adaptive=True)
        out["noise"] = _noise(name)
        out["count_noise"] = _count_noise(name)
        out["mixed"] = _train_mixed_precision(name)
        out["collectives"] = {c: _collectives(name, c) for c in ("per_layer", "flat")}
    return out


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """name -> the ranks' results; one 2-process spawn per model, shared by the tests."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = run_on_ranks(_every_run, tmp_path_factory.mktemp(name), name)
        return cache[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama", "gpt2_lora"])
def test_fsdp2_two_ranks_equal_one_process_oracle(spawned, name):
    ranks = spawned(name)
    initial = {n: p for n, p in FACTORIES[name](BATCH).model.named_parameters() if p.requires_grad}
    for i, config in enumerate(CONFIGS):
        normalizer = 1.0 if config[3] == "sum" else BATCH
        expected = _oracle(name, ranks[0]["results"][i]["groups"], normalizer,
                           case=FACTORIES[name](BATCH))
        for ours in ranks:
            assert_same_update(initial, ours["results"][i]["params"], expected,
                               name.split("_")[0], config)
        assert ranks[0]["results"][i]["epsilon"] == ranks[1]["results"][i]["epsilon"]
        clipping = config[0]
        after = ranks[0]["results"][i]["units_after_backward"]
        if clipping == "flat":  # sums known at the end of backward only
            assert after > 0, config
        elif name == "llama":  # every group completes inside backward: FSDP's own reduce-scatter
            assert after == 0, config
    # Poisson: the same batches as one dpfused process (itself checked against the oracle).
    # Tolerances as assert_same_update's: HF Llama's RMSNorm computes in float32.
    one_process = _train_poisson(name, 1)["params"]
    for ours in ranks:
        assert_same_update(initial, ours["poisson"]["params"], one_process, name.split("_")[0],
                           "poisson")
    assert sum(r["poisson"]["padded"] for r in ranks) > 0  # a rank ran a weight-0 example
    if name == "llama":  # adaptive thresholds: counts over the ranks, padding not counted
        one_process = _train_poisson(name, 1, adaptive=True)
        for ours in ranks:
            torch.testing.assert_close(ours["adaptive"]["thresholds"],
                                       one_process["thresholds"], rtol=1e-6, atol=0)
            assert_same_update(initial, ours["adaptive"]["params"], one_process["params"],
                               "llama", "adaptive")
        assert len(set(one_process["thresholds"])) > 1  # the thresholds did move apart


@pytest.mark.slow
def test_fsdp2_noise_mixed_precision_and_collectives(spawned):
    ranks = spawned("llama")
    # Noise: zero gradients, so each rank's shard is N(0, (sigma C / B)^2) alone.
    shards = [torch.cat([g.flatten() for g in r["noise"].values()]) for r in ranks]
    for shard in shards:
        assert shard.numel() > 800
        assert abs(shard.std().item() / (SIGMA * CLIP / BATCH) - 1) < 0.1
        assert abs(shard.mean().item()) < 4 * SIGMA * CLIP / BATCH / shard.numel() ** 0.5
    n = min(s.numel() for s in shards)
    corr = torch.corrcoef(torch.stack([shards[0][:n], shards[1][:n]]))[0, 1]
    assert abs(corr) < 4 / n ** 0.5  # the ranks' streams are not the same stream
    # Adaptive counts: one N(0, sigma_b^2) in total (not sigma_b^2 per rank), equal on all ranks.
    counts = ranks[0]["count_noise"]
    torch.testing.assert_close(ranks[1]["count_noise"], counts, rtol=0, atol=0)
    assert abs(counts.std().item() / COUNT_STD - 1) < 0.05  # 4000 draws: std error ~1.1%
    # bf16 compute, float32 reduction: the float64 oracle to bf16 accuracy, float32 shards.
    initial = {n: p.float() for n, p in models.llama(BATCH).model.named_parameters()}
    expected = {n: p.float() for n, p in _oracle("llama", ranks[0]["mixed"]["groups"]).items()}
    for ours in ranks:
        assert ours["mixed"]["grad_dtypes"] == {torch.float32}
        update = torch.cat([(expected[n] - initial[n]).flatten() for n in expected])
        got = torch.cat([(ours["mixed"]["params"][n] - initial[n]).flatten() for n in expected])
        assert (got - update).norm() / update.norm() < 0.03
    # per_layer: exactly the collectives of non-private FSDP (no all-reduce, no broadcast);
    # flat: the same counts too, the reduce-scatters running after backward.
    for clipping, counted in ranks[0]["collectives"].items():
        assert counted["private"] == counted["baseline"], clipping
        assert counted["baseline"]["_reduce_scatter_base_"] > 0
    assert ranks[0]["collectives"]["per_layer"]["units_after_backward"] == 0
    assert ranks[0]["collectives"]["flat"]["units_after_backward"] > 0
