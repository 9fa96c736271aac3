"""DPDPOTrainer (dpfused.hf_dpo): one preference pair is one example.

Tiny random-init Llama (+ LoRA) and GPT-2 in float64 on CPU, seconds each. The privacy-critical
check is the float64 oracle: per-pair gradients of the sigmoid DPO loss from torch.func, one pair
at a time on an uninstrumented copy, clipped as ONE example (both completions together), summed
and scaled, against the parameters after one DPDPOTrainer step at sigma = 0. The per-pair losses
are checked against TRL's own ``DPOTrainer._compute_loss`` on one pair at a time.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from torch.func import functional_call, grad  # noqa: E402

from dpfused.hf import PRIVACY_SUMMARY_NAME, PrivacyArguments  # noqa: E402
from dpfused.hf_trl import DPDPOTrainer  # noqa: E402

WORDS = "<pad> <eos> the a cat dog sat ran on mat log fast slow and".split()
PER_DEVICE, ACCUMULATION, LR, BETA = 2, 3, 0.05, 0.5  # expected logical batch: 6 pairs


def tokenizer():
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                                eos_token="<eos>")


def preference_pairs(repeat=3):
    """4 x ``repeat`` pairs, completions of different lengths (padding inside every batch)."""
    return datasets.Dataset.from_dict({
        "prompt": ["the cat", "a dog", "the dog sat", "a cat ran"] * repeat,
        "chosen": [" sat on the mat", " ran fast", " on a log", " slow and the dog sat"] * repeat,
        "rejected": [" ran", " sat on the log and", " fast", " mat"] * repeat,
    })


def llama(seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        pad_token_id=0, eos_token_id=1, bos_token_id=1)).double()


def lora_config():
    # Random B (not PEFT's zeros): the policy differs from the reference (adapters off) at step 0.
    return peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"],
                           lora_dropout=0.0, init_lora_weights=False)


def gpt2(seed=0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(WORDS), n_positions=32, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, eos_token_id=1, bos_token_id=1)).double()


def dpo_config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=PER_DEVICE,
                  gradient_accumulation_steps=ACCUMULATION, max_steps=1, logging_steps=1,
                  report_to="none", save_strategy="no", disable_tqdm=True, bf16=False,
                  use_cpu=True, learning_rate=LR, lr_scheduler_type="constant", beta=BETA,
                  max_length=32, gradient_checkpointing=False)
    values.update(overrides)
    return trl.DPOConfig(**values)


def privacy(**overrides):
    values = dict(noise_multiplier=0.0, per_sample_max_grad_norm=1.0, privacy_seed=3,
                  accountant="rdp", delta=1e-3)
    values.update(overrides)
    return PrivacyArguments(**values)


def lora_trainer(tmp_path, *, privacy_arguments=None, dataset=None, **config):
    return DPDPOTrainer(model=llama(), args=dpo_config(tmp_path, **config),
                        train_dataset=preference_pairs() if dataset is None else dataset,
                        processing_class=tokenizer(), peft_config=lora_config(),
                        privacy=privacy_arguments or privacy())


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def is_step_log(entry):
    return "learning_rate" in entry


# ---- the float64 oracle -------------------------------------------------------------------------


def sequence_logp(call, input_ids, attention_mask, completion_mask):
    """log p(completion | prompt) of one sequence (batch of 1), from the full log-softmax."""
    logits = call(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return (logp * completion_mask[:, 1:]).sum()


def pair_rows(batch):
    """TRL's collated 2B rows as the list of pairs ((chosen row), (rejected row))."""
    keys = ("input_ids", "attention_mask", "completion_mask")
    pairs = batch["input_ids"].shape[0] // 2
    return [(tuple(batch[k][i:i + 1] for k in keys), tuple(batch[k][pairs + i:pairs + i + 1]
                                                           for k in keys))
            for i in range(pairs)]


def oracle_pair_grads(policy, pairs):
    """{name: (P, *shape)}: each pair's gradient of -log sigmoid(beta * (chosen log-ratio -
    rejected log-ratio)), from torch.func on the uninstrumented ``policy``, one pair at a time.
    ``pairs``: (chosen rows, rejected rows, reference log-probs of both), the latter constants.
    A loop, not tests/oracle.py's vmap: HF attention masks take data-dependent branches."""
    params = {n: p.detach() for n, p in policy.named_parameters() if p.requires_grad}
    others = {n: p.detach() for n, p in policy.named_parameters() if not p.requires_grad}
    buffers = dict(policy.named_buffers())

    def pair_loss(params, chosen, rejected, ref_chosen, ref_rejected):
        def call(**kwargs):
            return functional_call(policy, {**params, **others, **buffers}, (), kwargs)

        chosen_ratio = sequence_logp(call, *chosen) - ref_chosen
        rejected_ratio = sequence_logp(call, *rejected) - ref_rejected
        return -F.logsigmoid(BETA * (chosen_ratio - rejected_ratio))

    per_pair = [grad(pair_loss)(params, *pair) for pair in pairs]
    return {n: torch.stack([g[n] for g in per_pair]) for n in params}


def pair_norms(grads):
    return torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))


def plain_copy(model):
    """An uninstrumented copy of the trainer's policy, for the oracle. TRL's fused-head patch
    (an instance ``forward``) closes over the original model: the copy runs its class's forward."""
    copied = copy.deepcopy(model)
    base = copied.get_base_model() if hasattr(copied, "get_base_model") else copied
    base.__dict__.pop("forward", None)
    if hasattr(base, "_require_grads_hook"):  # PEFT with gradient checkpointing (TRL's setup)
        base.disable_input_require_grads()
    return copied


def lora_case():
    """Llama + a new LoRA adapter: TRL's reference is the base model (adapters off); gradient
    checkpointing on (TRL's default)."""

    def reference_of(policy):
        def reference_logp(*rows):
            with policy.disable_adapter():
                return sequence_logp(policy, *rows)
        return reference_logp

    trainer_parts = dict(model=llama(), peft_config=lora_config())
    return trainer_parts, reference_of, {"gradient_checkpointing": True}


def gpt2_case():
    """GPT-2, every parameter trained (tied embeddings); a separate copy of the base is the
    reference."""
    reference = gpt2()
    return (dict(model=gpt2(), ref_model=gpt2()),
            lambda policy: lambda *rows: sequence_logp(reference, *rows), {})


def with_reference(pairs, reference_logp):
    with torch.no_grad():
        return [(c, r, reference_logp(*c), reference_logp(*r)) for c, r in pairs]


def trainers_reference(trainer, batch):
    """The reference log-probs the trainer used for ``batch`` (TRL's compute_ref_log_probs, whose
    fused head computes in float32): constants of the pair loss, so the oracle uses them too."""
    model = trainer.model if trainer.ref_model is None else trainer.ref_model
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
    return [(c, r, ref_chosen[i].double(), ref_rejected[i].double())
            for i, (c, r) in enumerate(pair_rows(batch))]


@pytest.mark.parametrize("case", [lora_case, gpt2_case], ids=["llama-lora", "gpt2-full"])
def test_one_step_at_sigma_zero_is_the_mean_of_pair_gradients_clipped_as_one(tmp_path, case):
    """The privacy-critical check. C is the median per-pair norm, so about half the pairs are
    clipped: clipping the chosen and the rejected completion apart (TRL's 2B rows as 2B examples),
    or a wrong norm, would give another update."""
    parts, reference_of, config = case()
    trainer = DPDPOTrainer(args=dpo_config(tmp_path, optim="sgd", **config),
                           train_dataset=preference_pairs(),
                           processing_class=tokenizer(), privacy=privacy(), **parts)
    policy = plain_copy(trainer.model)
    reference_logp = reference_of(policy)
    data, collator = trainer.train_dataset, trainer.data_collator
    every_pair = [pair for i in range(len(data)) for pair in pair_rows(collator([data[i]]))]
    every_pair = with_reference(every_pair, reference_logp)
    threshold = pair_norms(oracle_pair_grads(policy, every_pair)).median().item()
    trainer.privacy.per_sample_max_grad_norm = threshold  # read when training makes the model private

    before = trainable(trainer.model)
    physical, drawn = [], []
    original = trainer.training_step

    def recording_step(model, inputs, num_items_in_batch=None):
        physical.extend(inputs.physical)
        drawn.append(trainer._dp_loader.current.local_size)
        return original(model, inputs, num_items_in_batch)

    trainer.training_step = recording_step
    trainer.train()

    batches = [b for b in physical if b["input_ids"].shape[0]]
    pairs = [pair for batch in batches for pair in trainers_reference(trainer, batch)]
    # Poisson over the 12 pairs; the pairs drawn are the examples the book-keeper counted.
    assert len(trainer._dp_loader.dataset) == len(data) == 12
    assert len(pairs) == drawn[0] >= 3 and len(batches) >= 2
    for c, r, ref_c, ref_r in pairs:  # TRL's float32 reference is the public base's
        own = with_reference([(c, r)], reference_logp)[0]
        torch.testing.assert_close((ref_c, ref_r), own[2:], rtol=1e-5, atol=1e-5)
    grads = oracle_pair_grads(policy, pairs)
    norms = pair_norms(grads)
    assert (norms > threshold).any() and (norms < threshold).any()
    factors = (threshold / (norms + 1e-6)).clamp(max=1.0)
    after = trainable(trainer.model)
    assert after.keys() == grads.keys()
    for name, g in grads.items():
        clipped_sum = (factors.view(-1, *[1] * (g.dim() - 1)) * g).sum(0)
        expected = -LR * clipped_sum / (PER_DEVICE * ACCUMULATION)  # B_norm: expected batch
        error = (after[name] - before[name] - expected).norm() / expected.norm()
        assert error < 1e-9, f"{name}: relative error {error:.3g}"


def test_a_forward_of_trls_2b_rows_is_refused_at_the_step(tmp_path):
    """The attack the pairing prevents: TRL's concatenated forward (2B rows, chosen and rejected
    of a pair in two example slots) would clip each half to C, 2C per pair. The book-keeper
    counts 2B examples for the B pairs drawn and refuses the step before any release."""

    class ConcatenatedForward(DPDPOTrainer):
        def per_example_loss(self, model, inputs):
            rows = {k: inputs[k] for k in ("input_ids", "attention_mask", "completion_mask")}
            chosen, rejected = _one_call_logps(model, rows).chunk(2)
            return -F.logsigmoid(self.beta * (chosen - rejected)), None

    trainer = ConcatenatedForward(model=llama(), args=dpo_config(tmp_path),
                                  train_dataset=preference_pairs(),
                                  processing_class=tokenizer(), peft_config=lora_config(),
                                  privacy=privacy(per_sample_max_grad_norm=0.1))
    with pytest.raises(RuntimeError, match="examples .*saw .*exactly one backward pass"):
        trainer.train()


def _one_call_logps(model, rows):
    logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, rows["input_ids"][:, 1:, None])
    return (logp[..., 0] * rows["completion_mask"][:, 1:]).sum(1)


# ---- the per-pair loss is TRL's ----------------------------------------------------------------

# Every per-pair loss type, several in one case with distinct weights (a wrong term shows in the
# weighted sum); label smoothing 0.1 suits both robust (< 0.5) and exo_pair (> 0).
LOSS_CASES = {
    "sigmoid": {},
    "hinge+ipo+exo_pair+nca_pair": dict(loss_types=["hinge", "ipo", "exo_pair", "nca_pair"],
                                        loss_weights=[1.0, 0.5, 2.0, 0.3], label_smoothing=0.1),
    "robust+bco_pair+sppo_hard+apo_zero": dict(
        loss_types=["robust", "bco_pair", "sppo_hard", "apo_zero"],
        loss_weights=[0.7, 1.3, 0.2, 3.0], label_smoothing=0.1),
    "apo_down+discopop+sigmoid_norm": dict(loss_types=["apo_down", "discopop", "sigmoid_norm"],
                                           loss_weights=[1.0, 0.4, 2.5]),
    "forward_kl": dict(f_divergence_type="forward_kl", loss_types=["sigmoid", "ipo"],
                       loss_weights=[1.0, 0.5]),
    "js_divergence": dict(f_divergence_type="js_divergence", loss_types=["hinge", "discopop"],
                          loss_weights=[1.0, 0.5]),
    "ld_alpha": dict(ld_alpha=0.5),
    "wpo": dict(use_weighting=True, loss_types=["sigmoid", "bco_pair"], loss_weights=[1.0, 0.5]),
}


@pytest.fixture(scope="module")
def loss_trainer(tmp_path_factory):
    """A DPDPOTrainer (not trained: no instrumentation) whose fused head also gives WPO's
    log_sum_sq_probs, so one trainer serves every case."""
    return lora_trainer(tmp_path_factory.mktemp("losses"), dataset=preference_pairs(1),
                        use_weighting=True)


def _set(trainer, settings):
    defaults = dict(loss_types=["sigmoid"], loss_weights=None, label_smoothing=0.0,
                    f_divergence_type="reverse_kl", ld_alpha=None, use_weighting=False)
    for name, value in {**defaults, **settings}.items():
        setattr(trainer, name, value)
    trainer.loss_weights = trainer.loss_weights or [1.0] * len(trainer.loss_types)


@pytest.mark.parametrize("settings", LOSS_CASES.values(), ids=LOSS_CASES.keys())
def test_each_pair_loss_is_trls_loss_of_that_pair_alone(loss_trainer, settings):
    """DPDPOTrainer's per-pair losses on a batch of pairs, against TRL's _compute_loss (the mean
    over a batch) called on each pair alone. TRL's fused LM head computes log-probabilities in
    float32 whatever the model's dtype, hence the float32 tolerance; a wrong formula is off by
    orders of magnitude more."""
    trainer = loss_trainer
    _set(trainer, settings)
    model, collator, data = trainer.model, trainer.data_collator, trainer.train_dataset
    ours, _ = trainer.per_example_loss(model, collator([data[i] for i in range(len(data))]))
    trls = torch.stack([trainer._compute_loss(model, collator([data[i]]), False)
                        for i in range(len(data))])
    assert ours.shape == (len(data),) and ours.dtype == torch.float64
    torch.testing.assert_close(ours, trls.double(), rtol=1e-5, atol=1e-6)  # TRL's head: float32


def test_alpha_divergence_in_float32_is_trls(tmp_path):
    """TRL's alpha-divergence bounds exp() per dtype, with no float64 entry: checked in float32."""
    trainer = DPDPOTrainer(model=llama().float(), args=dpo_config(tmp_path),
                           train_dataset=preference_pairs(1), processing_class=tokenizer(),
                           peft_config=lora_config(), privacy=privacy())
    _set(trainer, dict(f_divergence_type="alpha_divergence"))
    trainer.f_alpha_divergence_coef = 0.5
    collator, data = trainer.data_collator, trainer.train_dataset
    ours, _ = trainer.per_example_loss(trainer.model, collator([data[i] for i in range(len(data))]))
    trls = torch.stack([trainer._compute_loss(trainer.model, collator([data[i]]), False)
                        for i in range(len(data))])
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, trls, rtol=1e-5, atol=1e-6)


# ---- training end to end ------------------------------------------------------------------------


def test_lora_dpo_trains_privately_and_logs_no_training_metric(tmp_path):
    """Three noised steps; only the adapter moves; the logs hold epsilon and the noised mean of
    the per-pair losses, none of TRL's training metrics; evaluation is TRL's."""
    arguments = privacy(noise_multiplier=1.0, log_loss="noised", loss_bound=2.0,
                        loss_noise_multiplier=10.0)
    trainer = lora_trainer(tmp_path, privacy_arguments=arguments, max_steps=3,
                           gradient_checkpointing=True)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
              if not p.requires_grad}
    trainer.train()
    assert trainer.state.global_step == 3 and trainer.privacy_engine.optimizer.steps_taken == 3
    logged = [e for e in trainer.state.log_history if is_step_log(e)]
    assert len(logged) == 3 and logged[-1]["epsilon"] == trainer.get_epsilon() > 0
    # TRL's training metrics (rewards, log-probs, token counts...) are functions of the pairs.
    assert all(math.isfinite(e["loss"]) for e in logged)  # clipped to [0, 2], noised, accounted
    released = set().union(*trainer.state.log_history)
    assert released <= {"learning_rate", "epsilon", "loss", "epoch", "step", "train_runtime",
                        "train_samples_per_second", "train_steps_per_second", "total_flos",
                        "train_loss"}
    for name, p in trainer.model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert "preference pair" in " ".join(trainer.privacy_report().assumptions)
    trainer.save_model(str(tmp_path / "model"))
    with open(tmp_path / "model" / PRIVACY_SUMMARY_NAME, encoding="utf-8") as f:
        assert "preference pair" in json.load(f)["privacy_unit"]
    assert "eval_loss" in trainer.evaluate(eval_dataset=preference_pairs(1))  # TRL's, no DP
    assert "eval_rewards/margins" in trainer.state.log_history[-1]


def test_precomputed_reference_log_probs_give_the_same_step(tmp_path):
    """precompute_ref_log_probs=True (before training, from the base model) and the on-the-fly
    reference forward give the same update at sigma = 0 (up to TRL's float32 reference head)."""
    steps = []
    for precompute in (False, True):
        trainer = lora_trainer(tmp_path / str(precompute), precompute_ref_log_probs=precompute,
                               privacy_arguments=privacy(per_sample_max_grad_norm=0.05))
        before = trainable(trainer.model)
        trainer.train()
        steps.append({n: p - before[n] for n, p in trainable(trainer.model).items()})
    assert steps[0].keys() == steps[1].keys()
    for name, step in steps[0].items():  # TRL's reference head runs in float32 on other batches
        assert step.norm() > 0
        assert (step - steps[1][name]).norm() / step.norm() < 1e-5, name


def _ddp_worker(rank, port, folder):
    # What `torchrun --nproc_per_node 2` sets up; DPOConfig then initializes gloo on the CPU.
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    try:
        trainer = gpt2_trainer(folder)
        assert trainer.args.world_size == 2
        trainer.train()
        assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
        torch.save({"params": trainable(trainer.model), "epsilon": trainer.get_epsilon()},
                   os.path.join(folder, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def gpt2_trainer(folder, **config):
    return DPDPOTrainer(model=gpt2(), ref_model=gpt2(),
                        args=dpo_config(folder, optim="sgd", max_steps=2, **config),
                        train_dataset=preference_pairs(), processing_class=tokenizer(),
                        privacy=privacy(noise_multiplier=1.0, per_sample_max_grad_norm=0.05))


@pytest.mark.slow
def test_two_processes_with_ddp_train_like_one_process_on_the_whole_logical_batch(tmp_path):
    """Two forwards (chosen, rejected) per backward through DistributedDataParallel: the same
    parameters and epsilon as one process whose physical batches hold the same logical batch."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    single = gpt2_trainer(tmp_path / "single", gradient_accumulation_steps=2 * ACCUMULATION)
    single.train()
    expected = trainable(single.model)
    for rank in range(2):
        ours = torch.load(tmp_path / f"rank{rank}.pt")
        assert ours["epsilon"] == single.get_epsilon()
        for name, value in expected.items():
            torch.testing.assert_close(ours["params"][name], value, rtol=1e-9, atol=1e-12,
                                       msg=name)


# ---- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("config, message", [
    (dict(loss_type=["aot"]), r"loss_type='aot'.*sorts the log-ratios of the whole batch"),
    (dict(loss_type=["aot_unpaired"]), r"loss_type='aot_unpaired'.*other pairs' log-ratios"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0]),
     r"loss_type='sft'.*over the whole batch"),
    (dict(padding_free=True), r"padding_free=True.*several pairs"),
    (dict(sync_ref_model=True), r"sync_ref_model=True.*reference"),
    (dict(activation_offloading=True), r"activation_offloading=True.*gradient_checkpointing"),
], ids=["aot", "aot_unpaired", "sft", "padding_free", "sync_ref_model", "activation_offloading"])
def test_settings_that_mix_pairs_or_move_the_reference_are_refused(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        lora_trainer(tmp_path, **config)


def test_liger_is_refused(tmp_path):
    config = dpo_config(tmp_path)
    config.use_liger_kernel = True  # set after __post_init__, which wants liger installed
    with pytest.raises(ValueError, match="use_liger_kernel=True"):
        DPDPOTrainer(model=llama(), args=config, train_dataset=preference_pairs(),
                     processing_class=tokenizer(), privacy=privacy())


def test_a_custom_collator_is_refused(tmp_path):
    with pytest.raises(ValueError, match="data_collator=function.*row i .*row B \\+ i"):
        DPDPOTrainer(model=llama(), args=dpo_config(tmp_path), data_collator=lambda rows: rows,
                     train_dataset=preference_pairs(), processing_class=tokenizer(),
                     peft_config=lora_config(), privacy=privacy())


def test_a_reference_sharing_trainable_parameters_is_refused(tmp_path):
    model, reference = gpt2(), gpt2()
    reference.transformer.h[0].mlp.c_fc.weight = model.transformer.h[0].mlp.c_fc.weight
    with pytest.raises(ValueError, match="ref_model shares trainable parameters with model"):
        DPDPOTrainer(model=model, ref_model=reference, args=dpo_config(tmp_path),
                     train_dataset=preference_pairs(), processing_class=tokenizer(),
                     privacy=privacy())


def test_the_moe_load_balancing_loss_is_refused(tmp_path):
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
        max_position_embeddings=32, output_router_logits=True, router_aux_loss_coef=0.01,
        pad_token_id=0, eos_token_id=1, bos_token_id=1))
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.0"):
        DPDPOTrainer(model=model, args=dpo_config(tmp_path), train_dataset=preference_pairs(),
                     processing_class=tokenizer(), peft_config=lora_config(),
                     privacy=privacy())


def test_loss_types_mixing_pairs_are_refused_at_the_loss_too(loss_trainer):
    """Changing the trainer's loss_types after construction does not get past the check."""
    _set(loss_trainer, dict(loss_types=["aot"]))
    data = loss_trainer.train_dataset
    try:
        with pytest.raises(ValueError, match="loss_type='aot'"):
            loss_trainer.per_example_loss(loss_trainer.model,
                                          loss_trainer.data_collator([data[0], data[1]]))
    finally:
        _set(loss_trainer, {})


def test_the_module_is_importable_from_hf_trl():
    import dpfused.hf_dpo
    import dpfused.hf_trl

    assert dpfused.hf_trl.DPDPOTrainer is dpfused.hf_dpo.DPDPOTrainer
    assert os.path.basename(dpfused.hf_dpo.__file__) == "hf_dpo.py"
