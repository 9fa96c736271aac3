"""DPTrainer under accelerate's FSDP2 plugin (docs/design.md §9): 2 processes on CPUs (gloo).

What ``accelerate launch --config_file recipes/accelerate_fsdp2.yaml train.py`` sets up: the
launcher's FSDP_* variables describe the plugin; accelerate turns FSDP on for GPUs only, so on CPUs
the test switches accelerate's state to FSDP2 itself, as recipes/accelerate_llama.py does
(``use_fsdp_on_cpu``). The Trainer then shards the model with ``fully_shard`` and dpfused makes
the shards private (``make_private_deferred``).

- Noise 0, float64: after three Poisson steps every rank's shards put together are the parameters
  of ONE process that trained on the same logical batches (tests/test_hf.py's DDP test, here with
  the physical batches of FSDP2's lockstep, padding included), LoRA adapters and tied GPT-2; the
  same epsilon; nothing un-noised in ``.grad`` before the step; no training loss logged.
- The noised training loss counts each example once (padding is no example).
- bf16 with LoRA: accelerate keeps float32 master weights and computes in bf16; the step is the
  one-process bf16 step to bf16 accuracy.
- Resume from a sharded checkpoint: each rank continues its own noise stream, the resumed run
  ends where the uninterrupted one does, bit for bit.
- With noise: one step's noise is at the one-process scale, each rank's shard from its own stream.
The refusals run in this process.
"""

from __future__ import annotations

import copy
import os
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from dpfused.hf import PRIVACY_STATE_NAME, DPTrainer, PrivacyArguments  # noqa: E402
from tests.distributed_harness import WORLD, run_on_ranks  # noqa: E402
from tests.test_hf import ACCUMULATION, TokenBlocks, gpt2, llama_lora, training_args  # noqa: E402

LAYER = {"llama_lora": "LlamaDecoderLayer", "gpt2": "GPT2Block"}
MODELS = {"llama_lora": llama_lora, "gpt2": gpt2}


def _fsdp_environment(layer: str, state_dict_type: str) -> None:
    """What `accelerate launch --config_file <fsdp_version: 2 config>` exports to each process
    besides the rendezvous (which the harness sets)."""
    os.environ.update(
        ACCELERATE_USE_FSDP="true", FSDP_VERSION="2",
        FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP", FSDP_TRANSFORMER_CLS_TO_WRAP=layer,
        FSDP_RESHARD_AFTER_FORWARD="true", FSDP_CPU_RAM_EFFICIENT_LOADING="false",
        FSDP_OFFLOAD_PARAMS="false", FSDP_STATE_DICT_TYPE=state_dict_type)


class CpuFSDP2Trainer(DPTrainer):
    """DPTrainer with accelerate switched to FSDP2 on CPUs (accelerate does it on GPUs only),
    from the plugin the launcher's environment describes; and a record of what each step ran."""

    def create_accelerator_and_postprocess(self):
        from accelerate import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables
        if state.mixed_precision != "no":  # what AcceleratorState does on GPUs
            state.fsdp_plugin.set_mixed_precision(state.mixed_precision)
        state.distributed_type = DistributedType.FSDP
        PartialState().distributed_type = DistributedType.FSDP
        self.is_fsdp_enabled = True
        self.padding_batches, self.loss_units, self.grads_seen = 0, [], []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.padding_batches += sum(info.padding > 0 for info in inputs.infos)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.privacy.log_loss == "noised":  # the sum over the ranks the step released
            self.loss_units.append(int(self._loss_units))
        return loss


class NothingUnnoisedBeforeTheStep(transformers.TrainerCallback):
    """Between backward and the step no parameter holds a gradient: HF's (or a user's)
    clip_grad_norm_ there reads nothing and changes nothing."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        params = list(self.trainer.model.parameters())
        self.trainer.grads_seen.append(sum(p.grad is not None for p in params))
        norm = self.trainer.accelerator.clip_grad_norm_(params, 1e-3)
        assert float(norm) == 0.0


def _trainer(cls, name, folder, privacy, *, model=None, **overrides):
    """The Trainer builds the optimizer (plain SGD) itself: under FSDP it refuses one passed in,
    which would hold the unsharded parameters."""
    trainer = cls(model=model or MODELS[name](), args=training_args(folder, optim="sgd",
                                                                    **overrides),
                  train_dataset=TokenBlocks(), privacy=privacy)
    if cls is CpuFSDP2Trainer:
        trainer.add_callback(NothingUnnoisedBeforeTheStep(trainer))
    return trainer


def _full_parameters(trainer):
    """The trained parameters, whole (every rank's shards put together on every rank)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in trainer.model.named_parameters() if p.requires_grad}


# ---- noise 0, float64: one process on the whole logical batch ------------------------------------

EQUIVALENCE = [  # (model, clipping, per_device_train_batch_size, log_loss)
    ("llama_lora", "flat", 1, "noised"),  # one example per physical batch: padding is frequent
    ("gpt2", "per_layer", 2, "off"),  # tied wte/lm_head in one FSDP unit
]


def _privacy(log_loss, noise=0.0, **extra):
    loss = {"loss_bound": 4.0, "loss_noise_multiplier": 5.0} if log_loss == "noised" else {}
    return PrivacyArguments(noise_multiplier=noise, per_sample_max_grad_norm=0.1, privacy_seed=7,
                            accountant="rdp", log_loss=log_loss, **loss, **extra)


def _equivalence_worker(rank, folder):
    results = []
    for name, clipping, physical, log_loss in EQUIVALENCE:
        _fsdp_environment(LAYER[name], "FULL_STATE_DICT")
        trainer = _trainer(CpuFSDP2Trainer, name, os.path.join(folder, name),
                           _privacy(log_loss, clipping=clipping),
                           per_device_train_batch_size=physical)
        trainer.train()
        assert trainer.accelerator.is_fsdp2 and trainer.args.world_size == WORLD
        results.append({
            "params": _full_parameters(trainer), "epsilon": trainer.get_epsilon(),
            "steps": trainer.state.global_step, "padding": trainer.padding_batches,
            "grads_seen": trainer.grads_seen, "loss_units": trainer.loss_units,
            "logged": [sorted(e) for e in trainer.state.log_history],
            "sharded": type(trainer.model).__name__})
        with pytest.raises(ValueError, match="trains once per trainer"):
            trainer.train()
    return results


@pytest.mark.slow
def test_two_fsdp2_processes_train_like_one_process_on_the_whole_logical_batch(tmp_path):
    ranks = run_on_ranks(_equivalence_worker, tmp_path, str(tmp_path), rendezvous="environment")
    for i, (name, clipping, physical, log_loss) in enumerate(EQUIVALENCE):
        single = _trainer(DPTrainer, name, tmp_path / f"single-{name}",
                          _privacy(log_loss, clipping=clipping),
                          per_device_train_batch_size=physical,
                          gradient_accumulation_steps=WORLD * ACCUMULATION)
        single.loss_units = []
        recorded = single.training_step

        def recording_step(model, inputs, num_items_in_batch=None, single=single,
                           recorded=recorded):
            loss = recorded(model, inputs, num_items_in_batch)
            if single._loss_units is not None and log_loss == "noised":
                single.loss_units.append(int(single._loss_units))
            return loss

        single.training_step = recording_step
        single.train()
        expected = {n: p.detach() for n, p in single.model.named_parameters() if p.requires_grad}
        for ours in ranks:
            result = ours[i]
            assert result["sharded"].startswith("FSDP") and result["steps"] == 3
            assert result["epsilon"] == single.get_epsilon() > 0
            assert result["grads_seen"] == [0, 0, 0]  # nothing un-noised readable in .grad
            logged_loss = any("loss" in keys for keys in result["logged"])
            assert logged_loss == (log_loss == "noised")  # "off": no training loss anywhere
            for param, value in expected.items():
                torch.testing.assert_close(result["params"][param], value, rtol=1e-9,
                                           atol=1e-12, msg=f"{name}: {param}")
        if log_loss == "noised":  # the released loss counts each example once: padding is none
            assert ranks[0][i]["loss_units"] == single.loss_units != []
    assert ranks[0][0]["padding"] + ranks[1][0]["padding"] > 0  # lockstep padding did run


# ---- bf16 with LoRA --------------------------------------------------------------------------------

def _bf16_worker(rank, folder):
    _fsdp_environment(LAYER["llama_lora"], "FULL_STATE_DICT")
    trainer = _trainer(CpuFSDP2Trainer, "llama_lora", folder, _privacy("off"),
                       model=llama_lora().float(), bf16=True, max_steps=2)
    trainer.train()
    layer = trainer.model.get_base_model().model.layers[0]
    policy = layer._get_fsdp_state()._fsdp_param_group.mp_policy
    sharded = {n: p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad}
    return {"params": _full_parameters(trainer), "param_dtype": policy.param_dtype,
            "sharded_dtypes": set(sharded.values())}


@pytest.mark.slow
def test_bf16_lora_under_fsdp2_is_the_one_process_bf16_step(tmp_path):
    ranks = run_on_ranks(_bf16_worker, tmp_path, str(tmp_path), rendezvous="environment")
    model = llama_lora().float()
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    single = _trainer(DPTrainer, "llama_lora", tmp_path / "single", _privacy("off"), model=model,
                      bf16=True, max_steps=2, gradient_accumulation_steps=WORLD * ACCUMULATION)
    single.train()
    for ours in ranks:
        assert ours["param_dtype"] == torch.bfloat16  # computed in bf16 ...
        assert ours["sharded_dtypes"] == {torch.float32}  # ... on float32 master weights
        # The whole update, all adapters together: lora_A moves by less than float32 resolves
        # in two steps (lora_B starts at 0), so no adapter is compared on its own.
        expected = torch.cat([(model.get_parameter(n).detach() - s).flatten()
                              for n, s in initial.items()])
        update = torch.cat([(ours["params"][n] - s).flatten() for n, s in initial.items()])
        assert expected.norm() > 0
        assert (update - expected).norm() <= 0.05 * expected.norm()


# ---- checkpoints: each rank resumes its own noise stream -------------------------------------------

SIGMA = 4.0


def _resume_worker(rank, folder):
    _fsdp_environment(LAYER["llama_lora"], "SHARDED_STATE_DICT")
    privacy = _privacy("off", noise=1.0)
    full = _trainer(CpuFSDP2Trainer, "llama_lora", os.path.join(folder, "full"), privacy,
                    max_steps=4, save_strategy="steps", save_steps=2)
    full.train()
    resumed = _trainer(CpuFSDP2Trainer, "llama_lora", os.path.join(folder, "resumed"), privacy,
                       max_steps=4)
    resumed.train(resume_from_checkpoint=os.path.join(folder, "full", "checkpoint-2"))
    # One step with noise and one without, on the same batches (the sampler's seed is the same):
    # the difference of the parameters is the noise the step released, lr * N(0, sigma^2 C^2) / B.
    steps = {}
    for sigma in (SIGMA, 0.0):
        one = _trainer(CpuFSDP2Trainer, "llama_lora", os.path.join(folder, f"one-{sigma}"),
                       _privacy("off", noise=sigma), max_steps=1)
        one.train()
        steps[sigma] = _full_parameters(one)
    noise = {n: steps[SIGMA][n] - steps[0.0][n] for n in steps[0.0]}
    expected_std = one.args.learning_rate * SIGMA * one.privacy.per_sample_max_grad_norm / \
        one.logical_batch_size
    return {"full": _full_parameters(full), "resumed": _full_parameters(resumed),
            "epsilons": (full.get_epsilon(), resumed.get_epsilon()), "noise": noise,
            "expected_std": expected_std}


@pytest.mark.slow
def test_a_sharded_resume_continues_each_ranks_own_noise_stream(tmp_path):
    """Each rank noises its own shard from its own stream; the checkpoint holds all of them and
    each rank resumes its own: the resumed run ends where the uninterrupted one does. (Resumed
    from rank 0's stream, rank 1's generator would be reseeded: other noise, other parameters;
    replayed from its seed, it would add noise already released.)"""
    from dpfused.checkpoints import load_plain

    ranks = run_on_ranks(_resume_worker, tmp_path, str(tmp_path), rendezvous="environment")
    state = load_plain(tmp_path / "full" / "checkpoint-2" / PRIVACY_STATE_NAME, what="test")
    streams = state["noise_of_ranks"]
    assert [s["rank"] for s in streams] == [0, 1] and {s["layout"] for s in streams} == {"per_rank"}
    assert not torch.equal(streams[0]["generators"][0]["state"],
                           streams[1]["generators"][0]["state"])
    assert any(n.startswith("pytorch_model_fsdp") for n in
               os.listdir(tmp_path / "full" / "checkpoint-2"))  # the model's shards
    for ours in ranks:
        assert ours["epsilons"][0] == ours["epsilons"][1]
        for name, value in ours["full"].items():
            assert torch.equal(ours["resumed"][name], value), name
    # The noise of one step: every coordinate once, at the one-process scale sigma C / B (a
    # rank adding its noise to the whole parameter, or every rank to its shard at another
    # scale, is off by sqrt(2) or more), and the two ranks' shards (Shard(0): the first and the
    # second half of the rows) from different streams, not the same draws twice.
    noise = ranks[0]
    assert all(torch.equal(noise["noise"][n], v)
               for n, v in ranks[1]["noise"].items())  # one parameter everywhere
    every = torch.cat([v.flatten() for v in noise["noise"].values()])
    assert every.numel() > 150 and abs(every.std().item() / noise["expected_std"] - 1) < 0.2
    for name, value in noise["noise"].items():
        half = value.shape[0] // 2
        assert value.shape[0] == 2 * half, name
        assert not torch.allclose(value[:half], value[half:]), name


# ---- in this process: what is refused, and why --------------------------------------------------

class _TrainerLike:
    """A stand-in for a DPTrainer (its class-level ``dp_fsdp2_tested``) whose accelerator was set
    up with ``plugin`` (None: no FSDP) or DeepSpeed."""

    dp_fsdp2_tested = True

    def __init__(self, plugin=None, *, deepspeed=False):
        self.is_deepspeed_enabled, self.is_fsdp_xla_enabled = deepspeed, False
        self.is_fsdp_enabled = plugin is not None
        self.accelerator = types.SimpleNamespace(
            state=types.SimpleNamespace(fsdp_plugin=plugin))


def _plugin(**overrides):
    values = dict(fsdp_version=2, cpu_offload=None, ignored_modules=None,
                  mixed_precision_policy=None, activation_checkpointing=False)
    values.update(overrides)
    return types.SimpleNamespace(**values)


def _narrow_reduce():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.bfloat16)


def _offload():
    from torch.distributed.fsdp import CPUOffloadPolicy

    return CPUOffloadPolicy()


@pytest.mark.parametrize("plugin, deepspeed, message", [
    (None, True, "DeepSpeed .*not supported by DPTrainer"),
    (_plugin(fsdp_version=1), False, "FSDP1 .*refused.*use FSDP2"),
    (_plugin(ignored_modules=["lm_head"]), False, "ignored_modules .*remove ignored_modules"),
    (_plugin(cpu_offload=_offload()), False, "CPU offload .*turn offloading off"),
    (_plugin(activation_checkpointing=True), False,
     "activation checkpointing .*fsdp_activation_checkpointing: false"),
    (_plugin(mixed_precision_policy=_narrow_reduce()), False,
     "reduce_dtype=torch.bfloat16.*set reduce_dtype to torch.float32"),
], ids=["deepspeed", "fsdp1", "ignored-modules", "cpu-offload", "activation-checkpointing",
        "bf16-reduce"])
def test_unsupported_sharding_is_refused_with_the_fix(plugin, deepspeed, message):
    from dpfused.hf import _refuse_unsupported_sharding

    with pytest.raises(ValueError, match=message):
        _refuse_unsupported_sharding(_TrainerLike(plugin, deepspeed=deepspeed))
    _refuse_unsupported_sharding(_TrainerLike(_plugin()))  # plain FSDP2: accepted


def test_fsdp1_training_arguments_are_refused_before_the_trainer_is_built(tmp_path):
    args = training_args(tmp_path)
    args.fsdp, args.fsdp_plugin_args = True, {"fsdp_version": 1}
    with pytest.raises(ValueError, match="FSDP1 .*refused"):
        DPTrainer(model=gpt2(), args=args, train_dataset=TokenBlocks(),
                  privacy=PrivacyArguments(noise_multiplier=1.0))


def test_bf16_master_weights_without_mixed_precision_are_refused_before_sharding():
    from dpfused.hf import _check_sharded_precision

    model = gpt2().to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"transformer\.wte\.weight' is torch\.bfloat16.*"
                                         r"TrainingArguments\(bf16=True\)"):
        _check_sharded_precision(model, types.SimpleNamespace(mixed_precision="no"))
    _check_sharded_precision(model, types.SimpleNamespace(mixed_precision="bf16"))  # upcast


def test_trl_trainers_are_refused_under_fsdp2_until_tested():
    from dpfused.hf import _refuse_unsupported_sharding

    class Untested(_TrainerLike):
        dp_fsdp2_tested = False

    with pytest.raises(ValueError, match="FSDP2 is not supported by Untested yet"):
        _refuse_unsupported_sharding(Untested(_plugin()))


def test_a_checkpoint_of_another_number_of_processes_is_refused():
    from dpfused.hf import _own_noise

    state = {"engine": {"noise": None}, "noise_of_ranks": [{"rank": 0}, {"rank": 1}]}
    with pytest.raises(ValueError, match="noise streams of 2 processes.*this run has 1.*"
                                         "Resume with 2 processes"):
        _own_noise(state)
    assert _own_noise({"engine": {"noise": "ours"}}) == {"noise": "ours"}  # one stream: as saved


def test_the_model_class_is_read_through_fsdp2s_renamed_class():
    from torch.distributed.fsdp import FSDPModule

    from dpfused.hf import _model_class_name

    renamed = type("FSDPGPT2LMHeadModel", (FSDPModule, transformers.GPT2LMHeadModel), {})
    model = gpt2()
    model.__class__ = renamed
    assert _model_class_name(model) == "GPT2LMHeadModel"
    assert _model_class_name(copy.deepcopy(gpt2())) == "GPT2LMHeadModel"
