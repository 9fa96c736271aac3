"""DPTrainer / DPSFTTrainer (dpfused.hf, dpfused.hf_trl) against hand-written make_private loops.

Tiny random-init Llama (+ LoRA) and GPT-2 on CPU, seconds each. The reference for every check is the
public API a user would write by hand: ``make_private`` with the same seeds, physical batches and
per-example loss; dpfused's own float64 oracles check that loop (tests/test_clipping_oracle.py).
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import dpfused  # noqa: E402
from dpfused.hf import PRIVACY_STATE_NAME, DPTrainer, PrivacyArguments  # noqa: E402

VOCAB, SEQ, N = 48, 8, 24
PER_DEVICE, ACCUMULATION = 2, 3  # physical batches of <= 2; expected logical batch 6 (q = 1/4)


class TokenBlocks(torch.utils.data.Dataset):
    """N random token rows; every third row has its last 3 labels ignored (-100)."""

    def __init__(self, n=N, classes=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.attention_mask = torch.ones(n, SEQ, dtype=torch.long)
        if classes:
            self.labels = torch.randint(0, classes, (n,), generator=g)
        else:
            self.labels = self.input_ids.clone()
            self.labels[::3, -3:] = -100

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i],
                "labels": self.labels[i]}


def llama_lora(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ)
    model = transformers.LlamaForCausalLM(config).double()
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    return peft.get_peft_model(model, lora)


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=1,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).double()


def llama_classifier(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ, num_labels=3,
        pad_token_id=0)
    return transformers.LlamaForSequenceClassification(config).double()


def training_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=PER_DEVICE,
                  gradient_accumulation_steps=ACCUMULATION, max_steps=3, logging_steps=1,
                  report_to="none", save_strategy="no", disable_tqdm=True,
                  lr_scheduler_type="constant", learning_rate=0.05, use_cpu=True)
    values.update(overrides)
    return transformers.TrainingArguments(**values)


def sgd(model, lr=0.05):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)


def dp_trainer(model, tmp_path, *, privacy=None, dataset=None, **overrides):
    privacy = privacy or PrivacyArguments(noise_multiplier=1.0, per_sample_max_grad_norm=0.1,
                                          privacy_seed=7, accountant="rdp")
    return DPTrainer(model=model, args=training_args(tmp_path, **overrides),
                     train_dataset=dataset or TokenBlocks(), optimizers=(sgd(model), None),
                     privacy=privacy)


def hand_written_loop(model, dataset, *, steps, seed=7, noise_multiplier=1.0, max_grad_norm=0.1,
                      clipping="flat", classes=None):
    """What a user writes with make_private: the reference for DPTrainer."""
    engine = dpfused.PrivacyEngine(accountant="rdp")  # fast; the TRL test uses "pld"
    model.train()
    loader = torch.utils.data.DataLoader(dataset, batch_size=PER_DEVICE * ACCUMULATION)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=sgd(model), data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, clipping=clipping, max_physical_batch_size=PER_DEVICE,
        sampling_generator=torch.Generator().manual_seed(seed),
        noise_generator=torch.Generator().manual_seed(seed + 1))
    epsilons, physical_batches = [], 0
    while len(epsilons) < steps:
        for batch in loader:
            physical_batches += 1
            optimizer.zero_grad()
            if batch["input_ids"].shape[0] > 0:
                logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
                if classes:
                    loss = F.cross_entropy(logits, batch["labels"])
                else:
                    loss = dpfused.per_example_lm_loss(logits, batch["labels"])
                loss.backward()
            optimizer.step()
            if loader.current.is_last_physical:
                epsilons.append(engine.get_epsilon(1e-5))
                if len(epsilons) == steps:
                    break
    return model, epsilons, physical_batches


def is_step_log(entry):
    """A training step's log entry (the training loss is not logged by default: issue 19.7)."""
    return "learning_rate" in entry


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_parameters(a, b):
    a, b = trainable(a), trainable(b)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-9, atol=1e-12, msg=name)


# ---- the step -------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_model, classes", [(llama_lora, None), (gpt2, None),
                                                 (llama_classifier, 3)],
                         ids=["llama-lora", "gpt2", "llama-sequence-classification"])
def test_steps_equal_the_hand_written_make_private_loop(tmp_path, make_model, classes):
    """Three logical steps with noise: same batches, same noise, same parameters, same epsilon."""
    dataset = TokenBlocks(classes=classes)
    model = make_model()
    reference, epsilons, physical = hand_written_loop(copy.deepcopy(model), dataset, steps=3,
                                                      classes=classes)
    assert physical > 3  # the logical batches were split into physical ones
    trainer = dp_trainer(model, tmp_path, dataset=dataset)
    trainer.train()
    assert trainer.state.global_step == 3
    assert_same_parameters(trainer.model, reference)
    logged = [entry["epsilon"] for entry in trainer.state.log_history if is_step_log(entry)]
    assert logged == pytest.approx(epsilons, rel=1e-12)
    assert trainer.state.log_history[-1]["epsilon"] == trainer.privacy_engine.get_epsilon(1e-5)


def test_noise_zero_step_is_the_clipped_mean_gradient(tmp_path):
    """One logical step at sigma = 0 against the float64 oracle: per-example gradients from
    torch.func, each clipped to C, summed and divided by the expected batch size q N."""
    from tests.oracle import per_example_grads

    dataset = TokenBlocks()
    model = gpt2()
    uninstrumented = copy.deepcopy(model)
    before = trainable(model)
    privacy = PrivacyArguments(noise_multiplier=0.0, per_sample_max_grad_norm=0.1, privacy_seed=3,
                               accountant="rdp")
    trainer = dp_trainer(model, tmp_path, dataset=dataset, privacy=privacy, max_steps=1)
    batches = []
    original = trainer.training_step

    def recording_step(model, inputs, num_items_in_batch=None):
        batches.append(inputs.physical)
        return original(model, inputs, num_items_in_batch)

    trainer.training_step = recording_step
    trainer.train()
    rows = {k: torch.cat([b[k] for b in batches[0]]) for k in ("input_ids", "labels")}
    assert len(batches[0]) >= 2 and len(rows["input_ids"]) > 0

    def example_loss(call, example):
        input_ids, labels = example
        return dpfused.per_example_lm_loss(call(input_ids=input_ids).logits, labels)

    grads = per_example_grads(uninstrumented, example_loss, (rows["input_ids"], rows["labels"]))
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    factors = (0.1 / (norms + 1e-6)).clamp(max=1.0)  # dpfused clips with C / (norm + 1e-6)
    after = trainable(trainer.model)
    for name, g in grads.items():
        expected = -0.05 * (factors.view(-1, *[1] * (g.dim() - 1)) * g).sum(0) / 6
        update = after[name] - before[name]
        error = (update - expected).norm() / expected.norm()
        assert error < 1e-9, f"{name}: relative error {error:.3g}"


def test_only_the_lora_adapter_is_trained(tmp_path):
    model = llama_lora()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    dp_trainer(model, tmp_path).train()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_evaluate_and_predict_run_without_dp(tmp_path):
    dataset, held_out = TokenBlocks(), TokenBlocks(seed=1)  # never evaluate on the training set
    model = gpt2()
    trainer = DPTrainer(model=model, args=training_args(tmp_path), train_dataset=dataset,
                        eval_dataset=held_out, optimizers=(sgd(model), None),
                        privacy=PrivacyArguments(noise_multiplier=1.0, privacy_seed=0,
                                                 accountant="rdp"))
    trainer.train()
    steps = trainer.privacy_engine.optimizer.steps_taken
    metrics = trainer.evaluate()
    plain = transformers.Trainer(model=model, args=training_args(tmp_path / "plain"),
                                 eval_dataset=held_out)
    assert metrics["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"], rel=1e-12)
    predictions = trainer.predict(held_out)
    assert predictions.predictions.shape[:2] == (N, SEQ)
    assert trainer.privacy_engine.optimizer.steps_taken == steps  # evaluation took no DP step


def test_bf16_trains_through_autocast(tmp_path):
    model = llama_lora().float()
    with pytest.warns(UserWarning, match="log_loss='unprotected'"):  # to see the raw loss
        privacy = PrivacyArguments(noise_multiplier=1.0, per_sample_max_grad_norm=0.1,
                                   privacy_seed=7, accountant="rdp", log_loss="unprotected")
        trainer = dp_trainer(model, tmp_path, privacy=privacy, bf16=True, max_steps=2)
    dtypes = []
    projection = model.get_base_model().model.layers[0].mlp.down_proj
    projection.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    trainer.train()
    assert torch.bfloat16 in dtypes  # the forward ran under bf16 autocast
    losses = [e["loss"] for e in trainer.state.log_history if is_step_log(e)]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in trainable(model).values())


def test_target_epsilon_is_spent_by_the_planned_run(tmp_path):
    privacy = PrivacyArguments(target_epsilon=4.0, per_sample_max_grad_norm=0.1, privacy_seed=0,
                               accountant="rdp")
    trainer = dp_trainer(gpt2(), tmp_path, privacy=privacy, max_steps=4)
    trainer.train()
    assert 3.8 <= trainer.get_epsilon() <= 4.0


# ---- checkpoints ----------------------------------------------------------------------------------


def test_resume_gives_the_same_batches_noise_and_epsilon(tmp_path):
    model = llama_lora()
    resumed_model = copy.deepcopy(model)
    full = dp_trainer(model, tmp_path / "full", max_steps=4, save_strategy="steps", save_steps=2)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / PRIVACY_STATE_NAME).is_file()
    summary = json.loads((checkpoint / "dpfused_privacy.json").read_text())
    assert summary["steps"] == 2 and summary["epsilon"] > 0

    resumed = dp_trainer(resumed_model, tmp_path / "resumed", max_steps=4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    assert_same_parameters(resumed.model, full.model)
    assert resumed.get_epsilon() == full.get_epsilon()
    logged = [e["epsilon"] for e in resumed.state.log_history if is_step_log(e)]
    assert logged == [e["epsilon"] for e in full.state.log_history if is_step_log(e)]


def test_resume_from_a_checkpoint_without_privacy_state_is_refused(tmp_path):
    model = llama_lora()
    plain = transformers.Trainer(model=copy.deepcopy(model), train_dataset=TokenBlocks(),
                                 args=training_args(tmp_path / "plain", max_steps=1,
                                                    save_strategy="steps", save_steps=1))
    plain.train()
    trainer = dp_trainer(model, tmp_path / "dp")
    with pytest.raises(ValueError, match="no dpfused_privacy.pt.*understating epsilon"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-1"))


def test_budget_stops_before_the_exceeding_step_with_a_checkpoint(tmp_path):
    _, epsilons, _ = hand_written_loop(gpt2(), TokenBlocks(), steps=3)
    budget = (epsilons[1] + epsilons[2]) / 2  # room for two steps, not three
    privacy = PrivacyArguments(noise_multiplier=1.0, per_sample_max_grad_norm=0.1, privacy_seed=7,
                               max_epsilon=budget, accountant="rdp")
    trainer = dp_trainer(gpt2(), tmp_path, privacy=privacy, max_steps=10)
    output = trainer.train()
    assert trainer.budget_exhausted and output.global_step == 2
    assert trainer.get_epsilon() == pytest.approx(epsilons[1]) and trainer.get_epsilon() <= budget
    assert any("dp_budget_exhausted" in e for e in trainer.state.log_history)
    assert (tmp_path / "checkpoint-2" / PRIVACY_STATE_NAME).is_file()


class _Payload:
    """What an attacker puts in a checkpoint: unpickling it touches a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_the_saved_model_folder_holds_the_report_and_no_generator_state(tmp_path):
    """Issue 19.4: save_model's folder (what push_to_hub uploads) must not carry the sampler's and
    the noise's state: with them, replaying training on D gives the released model bit for bit."""
    trainer = dp_trainer(llama_lora(), tmp_path / "run", max_steps=2, save_strategy="steps",
                         save_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "model"))
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert PRIVACY_STATE_NAME not in files and "dpfused_privacy.json" in files
    for name in files - {"dpfused_privacy.json"}:
        assert "generator" not in (tmp_path / "model" / name).read_bytes().decode("latin-1")
    report = json.loads((tmp_path / "model" / "dpfused_privacy.json").read_text())
    assert report["steps"] == 2 and report["epsilon"] == trainer.get_epsilon()
    assert report["training_loss_logged"].startswith("no training loss")
    assert not any("generator" in key or "sampler" in key or "seed" in key for key in report)
    # The checkpoint folder holds the resume state: secret, plain data.
    state = torch.load(tmp_path / "run" / "checkpoint-2" / PRIVACY_STATE_NAME, weights_only=True)
    assert state["engine"]["noise"]["kind"] == "torch"


def test_a_tampered_privacy_state_does_not_run_code_on_resume(tmp_path):
    """Issue 25.3: DPTrainer's resume reads dpfused_privacy.pt with weights_only=True."""
    model = gpt2()
    dp_trainer(copy.deepcopy(model), tmp_path / "full", max_steps=2, save_strategy="steps",
               save_steps=2).train()
    path = tmp_path / "full" / "checkpoint-2" / PRIVACY_STATE_NAME
    state = torch.load(path, weights_only=True)
    marker = tmp_path / "code-ran"
    state["engine"]["hook"] = _Payload(marker)
    torch.save(state, path)
    resumed = dp_trainer(model, tmp_path / "resumed", max_steps=4)
    with pytest.raises(ValueError, match="refused to load.*more than plain data"):
        resumed.train(resume_from_checkpoint=str(path.parent))
    assert not marker.exists()


@pytest.mark.parametrize("cut", ["ledger", "ledger-and-steps"])
def test_a_cut_ledger_in_the_privacy_state_is_refused(tmp_path, cut):
    """Issue 25.4: a ledger cut to 2 of 4 steps would report a smaller epsilon."""
    model = gpt2()
    dp_trainer(copy.deepcopy(model), tmp_path / "full", max_steps=4, save_strategy="steps",
               save_steps=4).train()
    path = tmp_path / "full" / "checkpoint-4" / PRIVACY_STATE_NAME
    state = torch.load(path, weights_only=True)
    accountant = state["engine"]["accountant"]
    accountant["entries"] = accountant["entries"][:2]
    if cut == "ledger-and-steps":
        state["engine"]["steps_taken"] = 2
    torch.save(state, path)
    resumed = dp_trainer(model, tmp_path / "resumed", max_steps=6)
    message = ("took 4 steps but the ledger records 2" if cut == "ledger"
               else "records 2 private steps but trainer_state.json global_step=4")
    with pytest.raises(ValueError, match=message):
        resumed.train(resume_from_checkpoint=str(path.parent))


# ---- the logged training loss (issue 19.7) ----------------------------------------------------


def test_no_training_loss_is_logged_by_default(tmp_path):
    trainer = dp_trainer(gpt2(), tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    output = trainer.train()
    assert all("loss" not in e and "train_loss" not in e for e in trainer.state.log_history)
    assert len([e for e in trainer.state.log_history if is_step_log(e)]) == 2
    saved = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert all("loss" not in e for e in saved["log_history"])
    assert math.isnan(output.training_loss) and "train_loss" not in output.metrics
    assert "no training loss was logged" in str(trainer.privacy_report())


def test_the_noised_loss_is_clipped_noised_and_accounted(tmp_path):
    sigma, sigma_loss, bound = 1.0, 4.0, 10.0
    privacy = PrivacyArguments(noise_multiplier=sigma, per_sample_max_grad_norm=0.1, privacy_seed=7,
                               accountant="rdp", log_loss="noised", loss_bound=bound,
                               loss_noise_multiplier=sigma_loss)
    trainer = dp_trainer(gpt2(), tmp_path, privacy=privacy, max_steps=3)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if is_step_log(e)]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    joint = (sigma ** -2 + sigma_loss ** -2) ** -0.5
    entries = trainer.privacy_engine.accountant.entries
    assert [e.sampled.noise_multiplier for e in entries] == pytest.approx([joint] * 3, rel=1e-12)
    plain = dp_trainer(gpt2(), tmp_path / "plain", max_steps=3)
    plain.train()
    assert trainer.get_epsilon() > plain.get_epsilon()  # the logged loss is paid for
    report = str(trainer.privacy_report())
    assert "training loss logged with noise" in report and "sigma_L = 4" in report


def test_the_noised_loss_mean_is_unbiased_with_exact_clipped_sums():
    from dpfused import privacy_math

    losses = torch.tensor([0.5, 3.0, 25.0, float("nan"), -1.0, float("inf")], dtype=torch.float64)
    units = privacy_math.clipped_loss_units(losses, bound=10.0)
    assert units.dtype == torch.int64
    assert units.item() * 10.0 / privacy_math.LOSS_GRID == pytest.approx(0.5 + 3 + 10 + 10 + 0 + 10)
    one = privacy_math.clipped_loss_units(torch.tensor([1e30]), bound=10.0)
    assert one.item() == privacy_math.LOSS_GRID  # one example adds at most the bound
    draws = torch.stack([privacy_math.noised_loss_mean(
        units, bound=10.0, noise_multiplier=2.0, expected_batch_size=4.0,
        generator=torch.Generator().manual_seed(i)) for i in range(4000)])
    assert draws.mean().item() == pytest.approx(33.5 / 4, abs=4 * 5 / math.sqrt(4000))
    assert draws.std().item() == pytest.approx(2.0 * 10.0 / 4, rel=0.05)


def test_target_epsilon_with_the_noised_loss_still_spends_the_target(tmp_path):
    privacy = PrivacyArguments(target_epsilon=4.0, per_sample_max_grad_norm=0.1, privacy_seed=0,
                               accountant="rdp", log_loss="noised", loss_bound=5.0,
                               loss_noise_multiplier=20.0)
    trainer = dp_trainer(gpt2(), tmp_path, privacy=privacy, max_steps=4)
    trainer.train()
    assert 3.8 <= trainer.get_epsilon() <= 4.0


def test_the_unprotected_loss_warns_and_the_report_says_so(tmp_path):
    with pytest.warns(UserWarning, match="NOT cover"):
        trainer = dp_trainer(gpt2(), tmp_path, max_steps=1, privacy=PrivacyArguments(
            noise_multiplier=1.0, privacy_seed=0, accountant="rdp", log_loss="unprotected"))
    trainer.train()
    assert [e for e in trainer.state.log_history if "loss" in e]
    assert "WITHOUT noise" in str(trainer.privacy_report())
    trainer.save_model(str(tmp_path / "model"))
    report = json.loads((tmp_path / "model" / "dpfused_privacy.json").read_text())
    assert "NOT covered" in report["training_loss_logged"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(log_loss="loud"), "log_loss must be one of .*, got 'loud'"),
    (dict(log_loss="noised"), "loss_bound must be a finite number > 0"),
    (dict(log_loss="noised", loss_bound=1.0), "loss_noise_multiplier must be a finite number"),
    (dict(loss_bound=1.0), "loss_bound apply to log_loss='noised' only"),
    (dict(secure_mode=True, privacy_seed=3), "secure_mode=True.*remove privacy_seed"),
])
def test_logging_and_secure_mode_arguments_are_checked(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        PrivacyArguments(noise_multiplier=1.0, **kwargs)


def test_secure_mode_trains_with_chacha20(tmp_path):
    trainer = dp_trainer(gpt2(), tmp_path, max_steps=1, privacy=PrivacyArguments(
        noise_multiplier=1.0, accountant="rdp", secure_mode=True))
    trainer.train()
    assert isinstance(trainer.privacy_engine.optimizer.generator, dpfused.ChaCha20Generator)
    assert trainer.privacy_engine.secure_mode and trainer.state.global_step == 1


def _ddp_trainer_worker(rank, port, folder, privacy=None):
    # What `torchrun` / `accelerate launch --num_processes 2` set up; TrainingArguments then
    # initializes torch.distributed (gloo on the CPU).
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    try:
        trainer = dp_trainer(gpt2(), folder, privacy=privacy)
        assert trainer.args.world_size == 2
        trainer.train()
        assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
        torch.save({"params": trainer_params(trainer), "epsilon": trainer.get_epsilon(),
                    "steps": trainer.state.global_step,
                    "losses": [e.get("loss") for e in trainer.state.log_history
                               if is_step_log(e)]}, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def trainer_params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_two_processes_train_with_ddp_like_one_process_on_the_whole_logical_batch(tmp_path):
    """torchrun with 2 processes: DDP carries the clipped sums; same logical batches (one
    sampler seed), rank 0 draws the one process's noise: the same parameters and epsilon as one
    process whose physical batches hold the same logical batch."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_trainer_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    single = dp_trainer(gpt2(), tmp_path / "single", gradient_accumulation_steps=2 * ACCUMULATION)
    single.train()
    expected = trainer_params(single)
    for rank in range(2):
        ours = torch.load(tmp_path / f"rank{rank}.pt")
        assert ours["steps"] == 3 and ours["epsilon"] == single.get_epsilon()
        for name, value in expected.items():
            torch.testing.assert_close(ours["params"][name], value, rtol=1e-9, atol=1e-12,
                                       msg=name)


@pytest.mark.slow
def test_the_noised_loss_under_ddp_is_one_release_for_both_ranks(tmp_path):
    """The clipped losses are summed over the ranks (exactly, int64) and noised once: every rank
    logs the same value, and epsilon is the one process's with the same privacy arguments."""
    import socket

    import torch.multiprocessing as mp

    privacy = PrivacyArguments(noise_multiplier=1.0, per_sample_max_grad_norm=0.1, privacy_seed=7,
                               accountant="rdp", log_loss="noised", loss_bound=8.0,
                               loss_noise_multiplier=5.0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_trainer_worker, args=(port, str(tmp_path), privacy), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert len(ranks[0]["losses"]) == 3 and all(math.isfinite(v) for v in ranks[0]["losses"])
    assert ranks[0]["losses"] == ranks[1]["losses"]
    single = dp_trainer(gpt2(), tmp_path / "single", privacy=privacy,
                        gradient_accumulation_steps=2 * ACCUMULATION)
    single.train()
    assert ranks[0]["epsilon"] == ranks[1]["epsilon"] == single.get_epsilon()


def _ddp_resume_worker(rank, port, folder):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    try:
        model = gpt2()
        full = dp_trainer(copy.deepcopy(model), os.path.join(folder, "full"), max_steps=4,
                          save_strategy="steps", save_steps=2)
        full.train()
        resumed = dp_trainer(model, os.path.join(folder, "resumed"), max_steps=4)
        resumed.train(resume_from_checkpoint=os.path.join(folder, "full", "checkpoint-2"))
        torch.save({"full": trainer_params(full), "resumed": trainer_params(resumed)},
                   os.path.join(folder, f"resume{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_a_ddp_resume_continues_the_noise_the_optimizer_draws_from(tmp_path):
    """Issue 19.3 under DDP: make_private replaces the noise generator by a replica on every rank;
    the checkpoint must hold the replica's stream, or the resumed run replays steps 1-2's noise."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_resume_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        ours = torch.load(tmp_path / f"resume{rank}.pt")
        for name, value in ours["full"].items():
            torch.testing.assert_close(ours["resumed"][name], value, rtol=1e-9, atol=1e-12,
                                       msg=name)


# ---- refusals -------------------------------------------------------------------------------------


class TwoGPUArguments(transformers.TrainingArguments):
    @property
    def n_gpu(self):
        return 2


def _with(tmp_path, **attributes):
    args = training_args(tmp_path)
    for key, value in attributes.items():
        setattr(args, key, value)
    return args


REFUSED_ARGUMENTS = {
    "data-parallel": (lambda p: TwoGPUArguments(output_dir=str(p), report_to="none"),
                      "nn.DataParallel.*CUDA_VISIBLE_DEVICES=0"),
    "deepspeed": (lambda p: _with(p, deepspeed={"zero_optimization": {"stage": 2}}),
                  "DeepSpeed config is not supported.*remove deepspeed="),
    "label-smoothing": (lambda p: training_args(p, label_smoothing_factor=0.1),
                        "label_smoothing_factor=0.1 is refused.*Set it to 0"),
    "group-by-length": (lambda p: training_args(p, train_sampling_strategy="group_by_length"),
                        "'group_by_length' is refused.*PrivacyArguments.sampling"),
    "fp16": (lambda p: _with(p, fp16=True), "GradScaler.*use bf16=True"),
    "auto-batch-size": (lambda p: training_args(p, auto_find_batch_size=True),
                        "auto_find_batch_size=True is refused.*per_device_train_batch_size"),
    "hub-checkpoints": (lambda p: _with(p, push_to_hub=True, hub_strategy="checkpoint"),
                        "hub_strategy='checkpoint' would upload checkpoint folders.*'every_save'"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_ARGUMENTS))
def test_unsupported_training_arguments_are_refused_with_the_fix(tmp_path, case):
    make_args, message = REFUSED_ARGUMENTS[case]
    with pytest.raises(ValueError, match=message):
        DPTrainer(model=gpt2(), args=make_args(tmp_path), train_dataset=TokenBlocks(),
                  privacy=PrivacyArguments(noise_multiplier=1.0))


def test_compute_loss_func_is_refused(tmp_path):
    with pytest.raises(ValueError, match="compute_loss_func is refused.*per_example_loss"):
        DPTrainer(model=gpt2(), args=training_args(tmp_path), train_dataset=TokenBlocks(),
                  compute_loss_func=lambda outputs, labels, num_items_in_batch=None: 0,
                  privacy=PrivacyArguments(noise_multiplier=1.0))


def test_custom_compute_loss_needs_the_per_example_contract(tmp_path):
    class MixingTrainer(DPTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**inputs).loss  # HF's token mean over the batch

    with pytest.raises(TypeError, match="overrides compute_loss.*per_example_loss.*"
                                        "dp_compute_loss_is_per_example = True"):
        MixingTrainer(model=gpt2(), args=training_args(tmp_path), train_dataset=TokenBlocks(),
                      privacy=PrivacyArguments(noise_multiplier=1.0))

    class Certified(MixingTrainer):
        dp_compute_loss_is_per_example = True

    Certified(model=gpt2(), args=training_args(tmp_path), train_dataset=TokenBlocks(),
              privacy=PrivacyArguments(noise_multiplier=1.0))


def test_custom_train_sampler_is_refused(tmp_path):
    class OwnSampler(DPTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    with pytest.raises(ValueError, match="overrides _get_train_sampler: a custom train sampler is "
                                         "refused.*PrivacyArguments.sampling"):
        OwnSampler(model=gpt2(), args=training_args(tmp_path), train_dataset=TokenBlocks(),
                   privacy=PrivacyArguments(noise_multiplier=1.0))


def test_privacy_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="exactly one of noise_multiplier"):
        PrivacyArguments()
    with pytest.raises(ValueError, match="exactly one of noise_multiplier"):
        PrivacyArguments(noise_multiplier=1.0, target_epsilon=3.0)
    trainer = dp_trainer(gpt2(), tmp_path, privacy=PrivacyArguments(noise_multiplier=1.0, delta=0.1))
    with pytest.raises(ValueError, match=r"delta=0.1 is not below 1/N = 1/24"):
        trainer.train()


# ---- TRL ------------------------------------------------------------------------------------------


def tiny_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    words = "<pad> <eos> the a cat dog sat ran on mat log fast slow and".split()
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                                eos_token="<eos>")


def sft_parts(tmp_path, **config):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    texts = ["the cat sat on the mat", "a dog ran fast", "the dog sat on a log",
             "a cat ran slow and the dog sat"] * 6
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        pad_token_id=0, eos_token_id=1, bos_token_id=1))
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=2,
                  gradient_accumulation_steps=2, max_steps=3, logging_steps=1, report_to="none",
                  save_strategy="no", disable_tqdm=True, max_length=16, bf16=False,
                  use_cpu=True, learning_rate=0.05)
    values.update(config)
    return dict(model=model, args=trl.SFTConfig(**values), processing_class=tokenizer,
                train_dataset=datasets.Dataset.from_dict({"text": texts}),
                peft_config=peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0))


def test_trl_sft_trains_a_lora_adapter_privately(tmp_path):
    from dpfused.hf_trl import DPSFTTrainer

    parts = sft_parts(tmp_path)
    trainer = DPSFTTrainer(**parts, privacy=PrivacyArguments(noise_multiplier=1.0, privacy_seed=0))
    trainer.train()
    assert trainer.state.global_step == 3
    logged = [e for e in trainer.state.log_history if is_step_log(e)]
    assert len(logged) == 3 and all(e["epsilon"] > 0 for e in logged)
    assert logged[-1]["epsilon"] == trainer.get_epsilon()
    assert trainer.privacy_engine.optimizer.steps_taken == 3
    assert all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("flag", ["packing", "padding_free"])
def test_trl_packing_is_refused_with_the_reason(tmp_path, flag):
    from dpfused.hf_trl import DPSFTTrainer

    parts = sft_parts(tmp_path, **{flag: True})
    with pytest.raises(ValueError, match=f"{flag}=True is refused.*one row"):
        DPSFTTrainer(**parts, privacy=PrivacyArguments(noise_multiplier=1.0))
