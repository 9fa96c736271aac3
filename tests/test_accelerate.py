"""HuggingFace accelerate: models and optimizers from ``accelerator.prepare`` (docs/design.md §9).

The supported order: ``model, optimizer = accelerator.prepare(model, optimizer)``, then
``make_private`` with the DataLoader NOT prepared by accelerate. Two processes (gloo, float64),
noise 0: the DDP-wrapped and the FSDP2-sharded model accelerate prepared, trained with
``accelerator.backward`` inside ``accelerator.accumulate``, end with the parameters of ONE process
that clipped the whole logical batch with the torch.func oracle. One spawn runs every
configuration. The refusals run in this process.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from dpfused.distributed import unwrap
from tests.distributed_harness import WORLD, run_on_ranks
from tests.test_ddp import BATCH, CLIP, LR, STEPS, _case, _group_names, _oracle, \
    assert_same_update

pytest.importorskip("accelerate")

CONFIGS = [  # (engine, model, clipping, max_physical_batch_size)
    ("ddp", "llama", "flat", None),
    ("ddp", "llama", "per_layer", 2),
    ("fsdp2", "llama", "flat", None),
    ("fsdp2", "llama", "per_layer", 2),
    ("fsdp2", "gpt2", "flat", None),  # tied wte/lm_head: accelerate shards them in one unit
]


def use_fsdp2_on_cpu(accelerator) -> None:
    """accelerate 1.15 turns FSDP on for GPUs (and other accelerators) only; on CPUs it falls back
    to DDP. fully_shard itself runs on CPUs (gloo), so switch accelerate's shared state to FSDP2,
    what ``Accelerator(fsdp_plugin=...)`` does on GPUs (the same as recipes/accelerate_llama.py)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=False)
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP  # as AcceleratorState sets it too


def _train(accelerator, kind, name, clipping, physical):
    case = _case(name)
    accelerator._models.clear()  # one model per run, as in a program (clip_grad_norm_ scans them)
    accelerator._optimizers.clear()
    model, optimizer = accelerator.prepare(case.model, torch.optim.SGD(case.model.parameters(),
                                                                       lr=LR))
    wrapped = nn.parallel.DistributedDataParallel if kind == "ddp" else type(case.model)
    assert isinstance(model, wrapped) and type(optimizer).__name__ == "AcceleratedOptimizer"
    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer,
        data_loader=DataLoader(TensorDataset(*case.inputs), batch_size=BATCH),
        noise_multiplier=0.0, max_grad_norm=CLIP, clipping=clipping, sampling="cyclic",
        max_physical_batch_size=physical)
    assert accelerator.prepare(loader) is loader  # not a torch DataLoader: handed back as it is
    assert isinstance(optimizer.original_optimizer, torch.optim.SGD)  # accelerate's unwrapped
    while optimizer.steps_taken < STEPS:
        for batch in loader:
            with accelerator.accumulate(model):  # gradient_accumulation_steps=1: no effect
                optimizer.zero_grad()
                accelerator.backward(case.batch_loss(model, batch))
                # Nothing un-noised in .grad before the step: nothing to clip, nothing changes.
                assert accelerator.clip_grad_norm_(model.parameters(), 1e-3) == 0
                optimizer.step()
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in unwrap(model).named_parameters()}
    return {"params": full, "groups": _group_names(unwrap(model), optimizer.instrumentation.groups),
            "epsilon": engine.get_epsilon(1e-5)}


def _fsdp2_after_make_private(accelerator) -> str:
    """The other order under FSDP2: accelerate shards a model make_private already instrumented.
    Returns the error of the first backward."""
    case = _case("llama")
    accelerator._models.clear()
    accelerator._optimizers.clear()
    model, optimizer, loader = dpfused.PrivacyEngine().make_private(
        module=case.model, optimizer=torch.optim.SGD(case.model.parameters(), lr=LR),
        data_loader=DataLoader(TensorDataset(*case.inputs), batch_size=BATCH),
        noise_multiplier=0.0, max_grad_norm=CLIP, sampling="cyclic")
    model, optimizer = accelerator.prepare(model, optimizer)
    with pytest.raises(ValueError) as refused:
        accelerator.backward(case.batch_loss(model, next(iter(loader))))
    return str(refused.value)


def _every_config(rank):
    # What `accelerate launch --multi_gpu --num_processes 2` sets up on a CPU machine: the
    # launcher's environment (run_on_ranks), then Accelerator().
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert dist.is_initialized() and accelerator.num_processes == WORLD
    results = []
    for config in CONFIGS:
        if config[0] == "fsdp2":  # a fresh plugin: it remembers the model's layer class
            use_fsdp2_on_cpu(accelerator)
        results.append(_train(accelerator, *config))
        assert accelerator.is_fsdp2 == (config[0] == "fsdp2")  # prepare kept the mode
    use_fsdp2_on_cpu(accelerator)
    return {"results": results, "reversed": _fsdp2_after_make_private(accelerator)}


@pytest.mark.slow
def test_models_prepared_by_accelerate_equal_one_process_oracle(tmp_path):
    saved = run_on_ranks(_every_config, tmp_path, rendezvous="environment")
    ranks = [r["results"] for r in saved]
    for i, (kind, name, clipping, physical) in enumerate(CONFIGS):
        initial = dict(_case(name).model.named_parameters())
        expected = _oracle(name, ranks[0][i]["groups"])
        for ours in ranks:
            assert_same_update(initial, ours[i]["params"], expected, name, CONFIGS[i])
        assert ranks[0][i]["epsilon"] == ranks[1][i]["epsilon"] > 0
    for r in saved:  # FSDP2 the other way round: refused at the first backward, with the order
        assert "replaced after make_private" in r["reversed"]
        assert "Shard the model first" in r["reversed"]


# ---- in this process: what is refused, and why ---------------------------------------------------

@pytest.fixture
def fresh_accelerate():
    """accelerate keeps its state in process-wide singletons: start and leave them empty."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

    reset()
    yield
    reset()


def _mlp_and_loader():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    data = TensorDataset(torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,)))
    return model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=4)


def _make_private(model, optimizer, loader):
    return dpfused.PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=1.0)


def test_the_accelerated_optimizer_is_unwrapped(fresh_accelerate):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model, optimizer, loader = _mlp_and_loader()
    inner = optimizer
    model, optimizer = accelerator.prepare(model, optimizer)
    _, dp_optimizer, dp_loader = _make_private(model, optimizer, loader)
    assert dp_optimizer.original_optimizer is inner
    assert accelerator.prepare(dp_loader) is dp_loader
    # Preparing the private optimizer afterwards wraps it again; with one accumulation step and
    # no scaler, accelerate's step is the DP step.
    prepared = accelerator.prepare(dp_optimizer)
    x, y = next(iter(dp_loader))
    prepared.zero_grad()
    accelerator.backward(nn.functional.cross_entropy(model(x), y))
    prepared.step()
    assert dp_optimizer.steps_taken == 1


@pytest.mark.parametrize("dispatch", [False, True])  # DataLoaderShard, DataLoaderDispatcher
def test_a_loader_prepared_by_accelerate_is_refused_before_calibration(fresh_accelerate,
                                                                       dispatch):
    from accelerate import Accelerator, DataLoaderConfiguration

    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(
        dispatch_batches=dispatch))
    model, optimizer, loader = _mlp_and_loader()
    prepared = accelerator.prepare(loader)
    with pytest.raises(TypeError, match="Dispatcher" if dispatch else "DataLoaderShard"):
        dpfused.PrivacyEngine().make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=prepared, target_epsilon=1.0,
            target_delta=1e-5, epochs=1, max_grad_norm=1.0)


def test_gradient_accumulation_is_refused_with_the_dp_way(fresh_accelerate):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    model, optimizer, loader = _mlp_and_loader()
    model, optimizer = accelerator.prepare(model, optimizer)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4.*max_physical_batch_size"):
        _make_private(model, optimizer, loader)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):  # also a raw optimizer
        _make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader)


def test_fp16_mixed_precision_is_refused(fresh_accelerate):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    model, optimizer, loader = _mlp_and_loader()
    model, optimizer = accelerator.prepare(model, optimizer)
    with pytest.raises(ValueError, match="mixed_precision='fp16'.*'bf16'"):
        _make_private(model, optimizer, loader)


def test_a_grad_scaler_in_the_accelerated_optimizer_is_refused(fresh_accelerate):
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)
    model, optimizer, loader = _mlp_and_loader()
    scaled = AcceleratedOptimizer(optimizer, scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="GradScaler"):
        _make_private(model, scaled, loader)


def test_deepspeed_is_refused(fresh_accelerate, monkeypatch):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    accelerator = Accelerator(cpu=True)
    model, optimizer, loader = _mlp_and_loader()
    monkeypatch.setattr(accelerator.state, "distributed_type", DistributedType.DEEPSPEED)
    with pytest.raises(ValueError, match="DEEPSPEED is not supported.*FSDP2"):
        _make_private(model, optimizer, loader)


def test_launched_processes_without_a_process_group_are_refused(monkeypatch):
    # On a CPU machine `Accelerator()` (not cpu=True) under `accelerate launch` leaves
    # torch.distributed uninitialized: every process would train alone on all the data.
    monkeypatch.setenv("WORLD_SIZE", "2")
    model, optimizer, loader = _mlp_and_loader()
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2.*Accelerator\(cpu=True\)"):
        _make_private(model, optimizer, loader)
