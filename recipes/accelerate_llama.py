"""DP-SGD fine-tuning of a Llama-family model's LoRA adapter under HuggingFace accelerate.

    accelerate launch --config_file recipes/accelerate_fsdp2.yaml \\
        recipes/accelerate_llama.py                        # FSDP2, 2 processes, CPUs (gloo)
    accelerate launch --config_file recipes/accelerate_multi_process.yaml \\
        recipes/accelerate_llama.py                        # DistributedDataParallel
    accelerate launch --config_file recipes/accelerate_fsdp2.yaml --num_processes 8 \\
        recipes/accelerate_llama.py --device cuda          # one GPU per process, nccl

The model, data and flags are recipes/finetune_llama.py's (this recipe uses its functions; see its
docstring, e.g. --steps, --noise-multiplier, --epsilon, --gguf). What differs is who wraps the
model: accelerate, in the order dpfused supports (docs/design.md §9):

    accelerator = Accelerator(cpu=...)
    model, optimizer = accelerator.prepare(model, optimizer)    # DDP-wrapped or FSDP2-sharded
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer,
                                                   data_loader=loader, ...)  # NOT prepared
    for batch in loader:                                         # each rank gets its slice
        ...; accelerator.backward(loss); optimizer.step()

Not with dpfused: ``accelerator.prepare(loader)`` before make_private (dpfused splits each logical
batch over the ranks itself), ``gradient_accumulation_steps`` > 1 (use --max-physical-batch-size),
``accelerator.clip_grad_norm_`` (clipping is dpfused's --max-grad-norm), fp16. They are refused.

On CPUs (the default, gloo), ``Accelerator(cpu=True)`` is what joins the processes. accelerate
1.15 turns FSDP on for GPUs only; on CPUs it would fall back to DDP, so with an FSDP config this
recipe switches accelerate's state to FSDP2 itself (``use_fsdp_on_cpu``): the same config then
runs in CI.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)  # recipes/: finetune_llama.py and common.py
if HERE not in sys.path:  # there for `python recipes/...`, not for an import by path
    sys.path.insert(0, HERE)
import finetune_llama as llama  # noqa: E402 (sets the offline environment first)
from common import (IGNORE_INDEX, gpt2_tokenizer, load_corpus, load_gguf, perplexity,  # noqa: E402
                    split_articles, tokenize)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from accelerate import Accelerator, PartialState  # noqa: E402
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

import dpfused  # noqa: E402
from dpfused.distributed import unwrap  # noqa: E402


def use_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """An FSDP config on CPUs: accelerate 1.15 enables FSDP for GPUs and other accelerators only
    and silently wraps the model in DDP on CPUs. fully_shard itself runs on CPUs (gloo), so switch
    accelerate's shared state to FSDP with the plugin the config describes (``accelerate launch``
    passes it as FSDP_* variables), which is what ``Accelerator()`` does on GPUs."""
    if (accelerator.distributed_type != DistributedType.MULTI_CPU
            or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true"):
        return
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the environment
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP  # as AcceleratorState sets it too


def check_flags(cfg: llama.Config) -> None:
    if cfg.fsdp or cfg.ddp:
        raise ValueError("--fsdp/--ddp belong to recipes/finetune_llama.py under torchrun; here "
                         "the accelerate config decides (recipes/accelerate_*.yaml)")
    if not cfg.dp:
        raise ValueError("--no-dp: run recipes/finetune_llama.py --no-dp for the baseline")


def build(cfg: llama.Config):
    """The base model with its adapter, in train mode, and the train / held-out blocks."""
    torch.manual_seed(cfg.seed)  # the same base and batches on every rank
    if cfg.gguf:
        base, tokenizer = load_gguf(llama.require_gguf())
    else:
        tokenizer = gpt2_tokenizer()
        base = LlamaForCausalLM(llama.llama_config(cfg, tokenizer))
    base.config.use_cache = False
    model = llama.add_adapter(base, cfg).train()
    train_articles, eval_articles = split_articles(load_corpus(), cfg.eval_fraction, cfg.seed)
    return (base.config.to_dict(), model, tokenize(train_articles, tokenizer, cfg.block_size),
            tokenize(eval_articles, tokenizer, cfg.block_size))


def make_private(cfg: llama.Config, accelerator: Accelerator, model, train_set):
    """accelerate first (model and optimizer), then dpfused, with a loader accelerate never saw."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=llama.default_lr(cfg), weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    loader = DataLoader(train_set, batch_size=cfg.batch_size)
    steps = cfg.steps if cfg.steps is not None else cfg.epochs * len(loader)
    engine = dpfused.PrivacyEngine(accountant=cfg.accountant)
    common = dict(module=model, optimizer=optimizer, data_loader=loader,
                  max_grad_norm=cfg.max_grad_norm, clipping=cfg.clipping, loss_reduction="mean",
                  sampling="poisson", max_physical_batch_size=cfg.max_physical_batch_size)
    if cfg.epsilon is not None:
        model, optimizer, loader = engine.make_private_with_epsilon(
            target_epsilon=cfg.epsilon, target_delta=cfg.delta, steps=steps, **common)
    else:
        model, optimizer, loader = engine.make_private(noise_multiplier=cfg.noise_multiplier,
                                                       **common)
    return engine, model, optimizer, loader, steps


def train(cfg, accelerator, engine, model, optimizer, loader, steps) -> None:
    sharded = accelerator.is_fsdp2
    while optimizer.steps_taken < steps:
        for batch in loader:
            input_ids, attention_mask, labels = (t.to(accelerator.device) for t in batch)
            optimizer.zero_grad(set_to_none=True)
            if sharded:
                llama.check_fsdp_batch(loader.current, accelerator.num_processes)
            if input_ids.shape[0] > 0:  # an empty Poisson share still takes its (noisy) step
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                loss = dpfused.per_example_lm_loss(logits, labels, ignore_index=IGNORE_INDEX,
                                                   reduction="mean")
                accelerator.backward(loss)  # per-example clipping happens inside
            taken = optimizer.steps_taken
            optimizer.step()  # a no-op but for the last physical batch of a logical one
            if optimizer.steps_taken > taken and (optimizer.steps_taken % cfg.eps_every == 0
                                                  or optimizer.steps_taken == steps):
                accelerator.print(f"step {optimizer.steps_taken}/{steps}: epsilon "
                                  f"{engine.get_epsilon(delta=cfg.delta):.2f}")
            if optimizer.steps_taken >= steps:
                return


def save(cfg, accelerator, base_config, model, engine, out: Path) -> None:
    """training_state.pt and adapter/ as recipes/finetune_llama.py writes them (its
    ``load_checkpoint`` reads them), from the full weights gathered onto rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    if not accelerator.is_main_process:
        return
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.full:
        unwrap(model).save_pretrained(out / "adapter", state_dict=full)
    trained = {n for n, p in unwrap(model).named_parameters() if p.requires_grad}
    torch.save({
        "config": dataclasses.asdict(cfg), "base_config": base_config,
        "gguf_file": str(llama.require_gguf()) if cfg.gguf else None,
        "step": engine.optimizer.steps_taken,
        "model": {k: v for k, v in full.items() if k in trained} if cfg.gguf else full,
        "optimizer": None, "epsilon": engine.get_epsilon(delta=cfg.delta), "delta": cfg.delta,
        "engine": engine.state_dict(),
    }, out / "training_state.pt")


def main(argv: list[str] | None = None) -> dict:
    cfg = llama.parse_args(argv)
    check_flags(cfg)
    start = time.perf_counter()
    accelerator = Accelerator(cpu=cfg.device == "cpu")  # cpu=True: gloo; else nccl on GPUs
    use_fsdp_on_cpu(accelerator)
    base_config, model, train_set, eval_set = build(cfg)
    engine, model, optimizer, loader, steps = make_private(cfg, accelerator, model, train_set)
    kind = "FSDP2" if accelerator.is_fsdp2 else "DDP" if accelerator.num_processes > 1 else "one"
    accelerator.print(f"accelerate: {accelerator.num_processes} processes, {kind}; "
                      f"{len(train_set)} training blocks, DP {cfg.clipping} clipping, "
                      f"Poisson sampling, sigma {optimizer.noise_multiplier:.3f}")
    device = str(accelerator.device)
    ppl_before = perplexity(model, eval_set, cfg.eval_batch_size, device)  # collective
    train(cfg, accelerator, engine, model, optimizer, loader, steps)
    dpfused.detach(unwrap(model))
    ppl_after = perplexity(model, eval_set, cfg.eval_batch_size, device)
    eps = engine.get_epsilon(delta=cfg.delta)
    accelerator.print(f"held-out perplexity {ppl_before:.1f} -> {ppl_after:.1f}; privacy: "
                      f"epsilon = {eps:.2f} at delta = {cfg.delta:g} after {steps} steps")
    if cfg.out:
        save(cfg, accelerator, base_config, model, engine, Path(cfg.out))
        accelerator.print(f"checkpoint: {cfg.out}")
    accelerator.print(f"wall time: {time.perf_counter() - start:.0f} s")
    accelerator.end_training()
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"ppl_before": ppl_before, "ppl_after": ppl_after, "epsilon": eps, "steps": steps}


if __name__ == "__main__":
    main()
