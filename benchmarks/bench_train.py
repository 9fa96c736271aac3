"""End-to-end DP-SGD training steps: dpfused against non-private training and Opacus.

For every model, sequence length and method it trains the same randomly initialised model on the
same synthetic batches with the same optimizer (AdamW) and reports examples/s, tokens/s and peak GPU
memory, each also as a ratio to the non-private baseline measured in the same run; optionally
(`--max-batch`) the largest batch that fits in GPU memory.

Models (random init from configs, nothing is downloaded):
    gpt2-small (124M) and gpt2-medium (355M), float32, tied input/output embedding;
    llama-1b (Llama-3.2-1B shape: d=2048, 16 layers, 32 heads / 8 kv heads, MLP 8192, vocabulary
        128256, tied embedding), bfloat16;
    resnet18-gn: ResNet-18 with GroupNorm for 32x32 images, 10 classes, float32.
Methods:
    nonprivate          plain training, no clipping, no noise;
    dpfused_per_layer   dpfused, a clipping group per layer (fast path);
    nonprivate_fp16, dpfused_per_layer_fp16: float16 autocast with a static loss scale 2^12
                        (torch.amp.GradScaler; dpfused.amp.GradScaler);
    dpfused_flat        dpfused, one group (book-keeping);
    dpfused_per_device  dpfused, a group per device (one device here, so one group);
    opacus_hooks        Opacus 1.6 GradSampleModule (materialised per-example gradients), flat;
    opacus_ghost        Opacus 1.6 ghost clipping (two backward passes), flat.
Every private method uses noise_multiplier=1.0, max_grad_norm=1.0 and a fixed batch size (dpfused:
cyclic sampling; Opacus: poisson_sampling=False), so each step sees the same examples everywhere.

Writes a markdown table to stdout and train.json + train.png to --out.

    python benchmarks/bench_train.py                                  # full matrix on a CUDA GPU
    python benchmarks/bench_train.py --models gpt2-small --seq-lens 512 --methods nonprivate dpfused_per_layer
    python benchmarks/bench_train.py --max-batch                      # also search the largest batch (slow)
    python benchmarks/bench_train.py --tiny --out /tmp/bench          # CPU smoke run of the whole pipeline
    python benchmarks/bench_train.py --fsdp --ddp --nproc 8           # sharded / replicated, 8 GPUs

--fsdp / --ddp (multi-process; the script relaunches itself with torch.distributed.run, nccl on GPUs,
gloo on the CPU) add rows "fsdp:<method>" / "ddp:<method>" for nonprivate, dpfused_per_layer and
dpfused_flat: the model sharded with FSDP2 (fully_shard per block, then the root; float32
parameters, compute in the row's dtype, float32 reduce: MixedPrecisionPolicy) or wrapped in
DistributedDataParallel, B examples per rank (logical batch B x ranks), examples/s over all ranks,
peak memory of rank 0, ratios against the same mode's nonprivate row.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs are built in code; nothing may be fetched
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpfused
from dpfused.distributed import unwrap

METHODS = ("nonprivate", "dpfused_per_layer", "dpfused_flat", "dpfused_per_device",
           "opacus_hooks", "opacus_ghost", "nonprivate_fp16", "dpfused_per_layer_fp16")
FP16_SCALE = 2.0 ** 12  # the fp16 rows' static loss scale (torch's GradScaler / dpfused.amp)
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
LEARNING_RATE = 1e-4
SEED = 0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def gpt2(max_seq_len: int, *, n_embd: int, n_layer: int, n_head: int, vocab_size: int = 50257,
         tied: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=vocab_size,
                        n_positions=max(1024, max_seq_len), use_cache=False,
                        tie_word_embeddings=tied)
    return GPT2LMHeadModel(config)


def llama(max_seq_len: int, *, hidden: int, layers: int, heads: int, kv_heads: int,
          intermediate: int, vocab_size: int = 128256):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=intermediate,
                         vocab_size=vocab_size, max_position_embeddings=max(2048, max_seq_len),
                         tie_word_embeddings=True, rope_theta=500000.0, use_cache=False)
    return LlamaForCausalLM(config)


def _groups(channels: int) -> int:
    return math.gcd(16, channels)  # 16 groups where possible (De et al. 2022's DP ResNets)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.GroupNorm(_groups(c_out), c_out))

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(h)) + self.shortcut(x))


class ResNetGN(nn.Module):
    """ResNet for 32x32 images with GroupNorm: BatchNorm mixes examples, which DP-SGD forbids."""

    def __init__(self, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
                                  nn.GroupNorm(_groups(widths[0]), widths[0]))
        stages, c_in = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                stages.append(BasicBlock(c_in, width, stride=2 if i > 0 and j == 0 else 1))
                c_in = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x):  # (B, 3, 32, 32) -> (B, num_classes)
        h = self.stages(F.relu(self.stem(x)))
        return self.head(h.mean(dim=(2, 3)))


def resnet(max_seq_len: int, **kwargs):
    return ResNetGN(**kwargs)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "gpt2" | "llama" | "vision"
    build: Callable[[int], nn.Module]  # max_seq_len -> randomly initialised model
    batch_size: int  # default batch
    dtype: torch.dtype  # default dtype
    vocab_size: int = 0  # language models
    image_size: int = 32  # vision
    num_classes: int = 10  # vision

    @property
    def is_lm(self) -> bool:
        return self.family != "vision"


MODELS = {s.name: s for s in [
    ModelSpec("gpt2-small", "gpt2", partial(gpt2, n_embd=768, n_layer=12, n_head=12),
              16, torch.float32, vocab_size=50257),
    ModelSpec("gpt2-medium", "gpt2", partial(gpt2, n_embd=1024, n_layer=24, n_head=16),
              8, torch.float32, vocab_size=50257),
    # Untied output layer: the one GPT-2 on which Opacus' ghost clipping runs (it refuses tied
    # parameters), so issue 5's "dpfused >= 2x Opacus ghost on GPT-2-medium" is measurable.
    ModelSpec("gpt2-medium-untied", "gpt2",
              partial(gpt2, n_embd=1024, n_layer=24, n_head=16, tied=False),
              8, torch.float32, vocab_size=50257),
    ModelSpec("llama-1b", "llama", partial(llama, hidden=2048, layers=16, heads=32, kv_heads=8,
                                           intermediate=8192), 8, torch.bfloat16,
              vocab_size=128256),
    ModelSpec("resnet18-gn", "vision", resnet, 256, torch.float32),
    # --tiny: the same code paths at toy sizes, for the CPU smoke run and the test
    ModelSpec("gpt2-tiny", "gpt2", partial(gpt2, n_embd=32, n_layer=2, n_head=2, vocab_size=256),
              4, torch.float32, vocab_size=256),
    ModelSpec("llama-tiny", "llama", partial(llama, hidden=32, layers=2, heads=4, kv_heads=2,
                                             intermediate=64, vocab_size=256),
              4, torch.bfloat16, vocab_size=256),
    ModelSpec("resnet-tiny", "vision", partial(resnet, widths=(8, 16), blocks=(1, 1)),
              4, torch.float32),
]}
FULL_MODELS = ["gpt2-small", "gpt2-medium", "gpt2-medium-untied", "llama-1b", "resnet18-gn"]
TINY_MODELS = ["gpt2-tiny", "llama-tiny", "resnet-tiny"]


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
@dataclass
class Result:
    """One (model, sequence length, method) cell of the matrix."""

    model: str
    family: str
    seq_len: int | None  # None for vision
    method: str
    batch_size: int
    dtype: str
    status: str  # "ok", "OOM", "n/a: <why>" (Opacus cannot run it) or "error: <what>"
    step_ms: float | None = None  # median over the timed steps
    step_ms_all: list[float] = field(default_factory=list)
    examples_per_s: float | None = None
    tokens_per_s: float | None = None  # language models: B * T / step time
    peak_mem_gib: float | None = None  # torch.cuda.max_memory_allocated; None on CPU
    throughput_ratio: float | None = None  # examples/s / non-private examples/s
    memory_ratio: float | None = None  # peak memory / non-private peak memory
    max_batch: int | None = None  # --max-batch
    max_batch_ratio: float | None = None


@dataclass
class Measurement:
    status: str
    times: list[float] = field(default_factory=list)  # seconds per timed step
    peak_bytes: int | None = None


# ---------------------------------------------------------------------------------------------
# Data and losses
# ---------------------------------------------------------------------------------------------
def make_dataset(spec: ModelSpec, seq_len: int | None, n: int) -> TensorDataset:
    """Synthetic examples, the same for every method (fixed seed), kept on the CPU."""
    g = torch.Generator().manual_seed(SEED)
    if spec.is_lm:
        return TensorDataset(torch.randint(0, spec.vocab_size, (n, seq_len), generator=g))
    images = torch.randn(n, 3, spec.image_size, spec.image_size, generator=g)
    return TensorDataset(images, torch.randint(0, spec.num_classes, (n,), generator=g))


def to_device(batch, spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> list:
    if spec.is_lm:
        return [batch[0].to(device, non_blocking=True)]
    return [batch[0].to(device, dtype, non_blocking=True), batch[1].to(device, non_blocking=True)]


def lm_logits(model: nn.Module, spec: ModelSpec, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T, V) logits.

    GPT-2 gets explicit (B, T) position ids rather than HuggingFace's (1, T) broadcast over the
    batch: Opacus' embedding grad sampler takes the batch size from the lookup's input, so the
    position embedding gets a per-example gradient for a batch of one and flat clipping fails
    ("stack expects each tensor to be equal size", meta-pytorch/opacus#841). Every method gets
    the same ids, so all run the same forward (dpfused expands a (1, T) lookup itself anyway).
    """
    kwargs = {}
    if spec.family == "gpt2":
        batch, seq_len = ids.shape
        kwargs["position_ids"] = torch.arange(seq_len, device=ids.device).expand(batch, seq_len)
    return model(input_ids=ids, **kwargs).logits


def batch_loss(model: nn.Module, spec: ModelSpec, batch: list) -> torch.Tensor:
    """Mean over examples of each example's own loss (a per-example gradient must not depend on
    the other examples; HuggingFace's token-mean over the whole batch would break that)."""
    if spec.is_lm:
        ids = batch[0]  # (B, T)
        return dpfused.per_example_lm_loss(lm_logits(model, spec, ids), ids, reduction="mean")
    return F.cross_entropy(model(batch[0]), batch[1])


def ghost_loss(model: nn.Module, spec: ModelSpec, criterion, batch: list):
    """The same loss through Opacus' ghost-clipping criterion wrapper.

    For language models the wrapper takes flattened (B*T, V) logits and ``shape`` = (B, T, ...),
    computes token losses with reduction="none", averages them over each sequence's tokens and
    then over the batch: per-token-mean within an example, mean over examples, the same loss as
    per_example_lm_loss. The shift (predict t+1 from t) is done here, as per_example_lm_loss does.
    """
    if not spec.is_lm:
        return criterion(model(batch[0]), batch[1])
    ids = batch[0]  # (B, T)
    logits = lm_logits(model, spec, ids)[:, :-1]  # (B, T-1, V)
    vocab = logits.shape[-1]
    # .float(): per_example_lm_loss also takes the cross-entropy in float32
    return criterion(logits.reshape(-1, vocab).float(), ids[:, 1:].reshape(-1),
                     shape=logits.shape)


# ---------------------------------------------------------------------------------------------
# Trainers: one per method, each a model + optimizer + loader + step function
# ---------------------------------------------------------------------------------------------
class OpacusUnsupported(Exception):
    """Opacus refused the model or failed on it: reported as "n/a", not as a benchmark error."""


@dataclass
class Trainer:
    loader: Iterable
    step: Callable[[Any], None]  # one optimizer step on one loader batch
    close: Callable[[], None] = lambda: None  # undo instrumentation / hooks


def build_model(spec: ModelSpec, max_seq_len: int, device: torch.device,
                dtype: torch.dtype) -> nn.Module:
    """A fresh model with the same weights for every method (same seed)."""
    torch.manual_seed(SEED)
    with torch.device(device):  # initialise on the device: fast for the 1B model
        model = spec.build(max_seq_len)
    return model.to(dtype).train()


def make_trainer(method: str, spec: ModelSpec, data: TensorDataset, batch_size: int,
                 device: torch.device, dtype: torch.dtype, max_seq_len: int) -> Trainer:
    mode, _, method = method.rpartition(":")  # "fsdp:dpfused_flat" -> ("fsdp", "dpfused_flat")
    # FSDP2 keeps float32 parameters and computes in ``dtype`` (MixedPrecisionPolicy): dpfused
    # refuses to let FSDP round the clipped sums to bfloat16 before the noise (design §9).
    stored = torch.float32 if mode == "fsdp" else dtype
    model = parallelize(build_model(spec, max_seq_len, device, stored), mode, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    loader = DataLoader(data, batch_size=batch_size * world_of(mode), shuffle=False,
                        drop_last=True)
    if method == "nonprivate":
        step = partial(plain_step, model, optimizer, spec, device, dtype)
        return Trainer(loader, partial(rank_slice_step, step) if mode else step)
    if method == "nonprivate_fp16":
        scaler = torch.amp.GradScaler(device.type, init_scale=FP16_SCALE)
        return Trainer(loader, partial(fp16_step, model, optimizer, scaler, spec, device, dtype))
    if method == "dpfused_per_layer_fp16":
        return dpfused_trainer("per_layer", model, optimizer, loader, spec, device, dtype,
                               fp16=True)
    if method.startswith("dpfused_"):
        return dpfused_trainer(method.removeprefix("dpfused_"), model, optimizer, loader, spec,
                               device, dtype)
    if method.startswith("opacus_"):
        try:
            return opacus_trainer(method.removeprefix("opacus_"), model, optimizer, loader, spec,
                                  device, dtype)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:
            raise OpacusUnsupported(short_error(e)) from e
    raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")


def parallelize(model: nn.Module, mode: str, device: torch.device,
                compute_dtype: torch.dtype) -> nn.Module:
    """--fsdp: FSDP2, each transformer block / ResNet stage, then the root, computing in
    ``compute_dtype`` and reducing in float32; --ddp: DDP."""
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for module in model.modules():
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block, mp_policy=policy)
        return fully_shard(model, mp_policy=policy)
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def world_of(mode: str) -> int:
    return dist.get_world_size() if mode else 1


def rank_slice_step(step, batch):
    """Non-private multi-process baseline: each rank trains on its slice of the global batch, as
    dpfused's loader slices it (``batch[rank::world]``)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    step([t[rank::world] for t in batch])


def plain_step(model, optimizer, spec, device, dtype, batch):
    optimizer.zero_grad(set_to_none=True)
    batch_loss(model, spec, to_device(batch, spec, device, dtype)).backward()
    optimizer.step()


def fp16_step(model, optimizer, scaler, spec, device, dtype, batch):
    """float16 autocast with a loss scaler (the model's parameters stay in ``dtype``)."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.float16):
        loss = batch_loss(model, spec, to_device(batch, spec, device, dtype))
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def dpfused_trainer(clipping, model, optimizer, loader, spec, device, dtype, *,
                    fp16=False) -> Trainer:
    engine = dpfused.PrivacyEngine()
    # cyclic sampling: fixed batches in dataset order, the batches the other methods see
    model, dp_optimizer, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM, clipping=clipping,
        loss_reduction="mean", sampling="cyclic",
        nonfinite_gradients="drop" if fp16 else "raise",
    )
    if fp16:
        scaler = dpfused.amp.GradScaler(dp_optimizer, init_scale=FP16_SCALE)
        step = partial(fp16_step, model, dp_optimizer, scaler, spec, device, dtype)
    else:
        step = partial(plain_step, model, dp_optimizer, spec, device, dtype)
    return Trainer(dp_loader, step, close=partial(dpfused.detach, unwrap(model)))


def opacus_trainer(mode, model, optimizer, loader, spec, device, dtype) -> Trainer:
    """Opacus as its documentation sets it up: make_private on the unchanged model (no layer of
    ours needs ModuleValidator.fix: there is no BatchNorm), flat clipping, loss_reduction="mean".
    poisson_sampling=False keeps our fixed-size loader so every method sees the same batches.

    Loss: hooks mode backpropagates the same per_example_lm_loss as everyone else. Opacus'
    examples use a token-mean CrossEntropyLoss over the whole batch instead; with our fixed-length
    unpadded sequences that is the same number and the same per-example gradients (B * batch
    token mean = each example's token mean), so nothing is lost. Ghost mode must go through its
    criterion wrapper, which computes the same loss (see ghost_loss).
    """
    from opacus import PrivacyEngine

    engine = PrivacyEngine()  # secure_mode=False, as in Opacus' examples: torch's RNG
    kwargs = dict(module=model, optimizer=optimizer, data_loader=loader,
                  noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
                  poisson_sampling=False, loss_reduction="mean", grad_sample_mode=mode)
    if mode == "ghost":
        # ghost clipping needs Opacus' criterion wrapper: its loss.backward() runs the two
        # backward passes (norms, then the clipped gradient)
        gsm, dp_optimizer, criterion, dp_loader = engine.make_private(
            criterion=nn.CrossEntropyLoss(reduction="mean"), **kwargs)
        step = partial(ghost_step, gsm, dp_optimizer, criterion, spec, device, dtype)
    else:
        gsm, dp_optimizer, dp_loader = engine.make_private(**kwargs)
        step = partial(plain_step, gsm, dp_optimizer, spec, device, dtype)
    return Trainer(dp_loader, step, close=gsm.cleanup)


def ghost_step(model, optimizer, criterion, spec, device, dtype, batch):
    optimizer.zero_grad(set_to_none=True)
    ghost_loss(model, spec, criterion, to_device(batch, spec, device, dtype)).backward()
    optimizer.step()


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def short_error(error: BaseException, limit: int = 300) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def timed_steps(trainer: Trainer, n_warmup: int, n_steps: int, device) -> list[float]:
    """Wall time of each step after the warm-up, loader fetch included (the same for all)."""
    batches = iter(trainer.loader)
    times = []
    for _ in range(n_warmup + n_steps):
        start = time.perf_counter()
        trainer.step(next(batches))
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times[n_warmup:]


def measure(method: str, spec: ModelSpec, seq_len: int | None, batch_size: int, *,
            n_warmup: int, n_steps: int, device: torch.device, dtype: torch.dtype,
            max_seq_len: int) -> Measurement:
    """Set up one method on a fresh model, time its steps, free everything; never raises."""
    world = world_of(method.rpartition(":")[0])
    data = make_dataset(spec, seq_len, batch_size * world * (n_warmup + n_steps))
    free_memory(device)
    trainer, result = None, None
    try:
        trainer = make_trainer(method, spec, data, batch_size, device, dtype, max_seq_len)
        if device.type == "cuda":
            # after setup: the peak counts weights, optimizer state and what the steps allocate
            torch.cuda.reset_peak_memory_stats(device)
        times = timed_steps(trainer, n_warmup, n_steps, device)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        result = Measurement("ok", times, peak)
    except OpacusUnsupported as e:
        result = Measurement("OOM" if is_oom(e.__cause__ or e) else f"n/a: {e}")
    except Exception as e:  # noqa: BLE001 - one failing cell must not stop the matrix
        if is_oom(e):
            result = Measurement("OOM")
        elif method.startswith("opacus_"):
            result = Measurement(f"n/a: {short_error(e)}")  # failed in its first steps
        else:
            result = Measurement(f"error: {short_error(e)}")
    # outside the except blocks, so the traceback (and the tensors its frames hold) is gone
    if trainer is not None:
        close_quietly(trainer)
    del trainer, data
    free_memory(device)
    return result


def close_quietly(trainer: Trainer) -> None:
    try:
        trainer.close()
    except Exception as e:  # noqa: BLE001 - a failed cell may have left nothing to undo
        print(f"  (cleanup: {short_error(e)})", file=sys.stderr)


def max_batch_size(method, spec, seq_len, start, *, cap, **kwargs) -> int | None:
    """Largest batch that fits (GPU only), to ~3%: halve from ``start`` until a batch fits,
    double until one does not (or ``cap``), then bisect. Each probe is a fresh model, 2 steps.

    None when even batch 1 does not fit or a probe fails for another reason than OOM.
    """
    def fits(b: int) -> bool:
        status = measure(method, spec, seq_len, b, n_warmup=1, n_steps=1, **kwargs).status
        if status not in ("ok", "OOM"):
            raise _ProbeFailed(status)
        return status == "ok"

    try:
        lo, hi = max(1, min(start, cap)), None
        while not fits(lo):
            if lo == 1:
                return None
            lo, hi = lo // 2, lo
        while hi is None and lo < cap:
            b = min(cap, 2 * lo)
            lo, hi = (b, None) if fits(b) else (lo, b)
        while hi is not None and hi - lo > max(1, lo // 32):
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo
    except _ProbeFailed:
        return None


class _ProbeFailed(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------------------------
def run_matrix(args) -> list[Result]:
    rows: list[Result] = []
    max_seq_len = max(args.seq_lens)
    for name in args.models:
        spec = MODELS[name]
        dtype = args.dtype or spec.dtype
        batch_size = args.batch_size or spec.batch_size
        for seq_len in (args.seq_lens if spec.is_lm else [None]):
            for methods in method_cells(args):
                cell = []
                for method in methods:
                    log(f"[{name} T={seq_len or '-'} {method}] B={batch_size}")
                    cell.append(run_cell(method, spec, seq_len, batch_size, dtype, max_seq_len,
                                         args))
                add_ratios(cell)
                rows += cell
                if is_main_process():
                    save_partial(cell, args.out)
    return rows


PARALLEL_METHODS = ("nonprivate", "dpfused_per_layer", "dpfused_flat")


def method_cells(args) -> list[list[str]]:
    """One process: the methods. --fsdp/--ddp: each mode's methods ("fsdp:nonprivate", ...),
    each mode with its own baseline."""
    if not args.parallel:
        return [args.methods]
    methods = [m for m in args.methods if m in PARALLEL_METHODS]
    return [[f"{mode}:{m}" for m in methods] for mode in args.parallel]


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log(message: str) -> None:
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


def save_partial(cell: list[Result], out: Path) -> None:
    """Append a finished (model, T) cell to train.partial.jsonl: a run stopped by a time limit
    (a GPU lease) keeps every cell it measured."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.partial.jsonl", "a") as f:
        for row in cell:
            f.write(json.dumps(asdict(row)) + "\n")


def run_cell(method, spec, seq_len, batch_size, dtype, max_seq_len, args) -> Result:
    common = dict(device=args.device, dtype=dtype, max_seq_len=max_seq_len)
    m = measure(method, spec, seq_len, batch_size, n_warmup=args.warmup, n_steps=args.steps,
                **common)
    batch_size *= world_of(method.rpartition(":")[0])  # the global (logical) batch
    row = Result(spec.name, spec.family, seq_len, method, batch_size, str(dtype).split(".")[-1],
                 m.status)
    if m.status == "ok":
        step_s = statistics.median(m.times)
        row.step_ms = step_s * 1e3
        row.step_ms_all = [t * 1e3 for t in m.times]
        row.examples_per_s = batch_size / step_s
        row.tokens_per_s = batch_size * seq_len / step_s if seq_len else None
        row.peak_mem_gib = m.peak_bytes / 2**30 if m.peak_bytes is not None else None
    if args.max_batch and args.device.type == "cuda" and m.status in ("ok", "OOM"):
        row.max_batch = max_batch_size(method, spec, seq_len, batch_size, cap=args.max_batch_cap,
                                       **common)
    return row


def add_ratios(cell: list[Result]) -> None:
    """Each method against the non-private row of the same model and sequence length."""
    base = next((r for r in cell if r.method.rpartition(":")[2] == "nonprivate"
                 and r.status == "ok"), None)
    if base is None:
        return
    for r in cell:
        r.throughput_ratio = _ratio(r.examples_per_s, base.examples_per_s)
        r.memory_ratio = _ratio(r.peak_mem_gib, base.peak_mem_gib)
        r.max_batch_ratio = _ratio(r.max_batch, base.max_batch)


def _ratio(value, baseline):
    return value / baseline if value is not None and baseline else None


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def markdown_table(rows: list[Result]) -> str:
    def fmt(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    lines = ["| model | T | method | B | dtype | status | step ms | examples/s | tokens/s "
             "| × throughput | peak GiB | × memory | max B | × max B |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = r.status if len(r.status) <= 120 else r.status[:117] + "..."
        lines.append(
            f"| {r.model} | {r.seq_len or '-'} | {r.method} | {r.batch_size} | {r.dtype} "
            f"| {status.replace('|', '/')} | {fmt(r.step_ms, '.1f')} | {fmt(r.examples_per_s, '.1f')} "
            f"| {fmt(r.tokens_per_s, '.0f')} | {fmt(r.throughput_ratio)} | {fmt(r.peak_mem_gib)} "
            f"| {fmt(r.memory_ratio)} | {fmt(r.max_batch, 'd')} | {fmt(r.max_batch_ratio)} |")
    return "\n".join(lines)


def save_plot(rows: list[Result], path: Path) -> None:
    """Grouped bars per (model, T): throughput, memory (and max-batch) ratio to non-private."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(_case(r) for r in rows))
    methods = [m for m in dict.fromkeys(r.method for r in rows) if m != "nonprivate"]
    panels = [("throughput_ratio", "throughput / non-private (higher is better)"),
              ("memory_ratio", "peak GPU memory / non-private (lower is better)")]
    if any(r.max_batch_ratio is not None for r in rows):
        panels.append(("max_batch_ratio", "max batch / non-private (higher is better)"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(7.0, 1.1 * len(cases)),
                                                      3.2 * len(panels)), squeeze=False)
    width = 0.8 / max(1, len(methods))
    by_key = {(_case(r), r.method): r for r in rows}
    for ax, (attr, title) in zip(axes[:, 0], panels):
        for k, method in enumerate(methods):
            for i, case in enumerate(cases):
                r = by_key.get((case, method))
                x = i - 0.4 + (k + 0.5) * width
                value = getattr(r, attr) if r else None
                if value is not None:
                    ax.bar(x, value, width, color=f"C{k}", label=method if i == 0 else None)
                elif r is not None and r.status != "ok":  # say why there is no bar
                    ax.text(x, 0.02, r.status.split(":")[0], rotation=90, fontsize=6,
                            ha="center", va="bottom", transform=ax.get_xaxis_transform())
            ax.bar(0, 0, 0, color=f"C{k}", label=method)  # legend entry even without data
        if not any(getattr(r, attr) is not None for r in rows):
            ax.text(0.5, 0.5, "not measured (no CUDA device)", ha="center", va="center",
                    transform=ax.transAxes)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xlim(-0.5, len(cases) - 0.5)
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, fontsize=7)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=6, ncol=min(5, len(unique)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _case(r: Result) -> str:
    return f"{r.model}\nT={r.seq_len}" if r.seq_len else r.model


def quiet_known_warnings() -> None:
    """Notices printed once per cell that say nothing about the benchmark."""
    warnings.filterwarnings("ignore", message="Secure RNG turned off")  # Opacus, secure_mode=False
    # Opacus' hooks on the first layer, whose input (ids, images) needs no gradient
    warnings.filterwarnings("ignore", message="Full backward hook is firing")


def metadata(args) -> dict:
    import transformers

    try:
        import opacus
        opacus_version = opacus.__version__
    except ImportError:
        opacus_version = None
    cuda = args.device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(args.device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "opacus": opacus_version, "dpfused": dpfused.__version__,
        "optimizer": f"AdamW(lr={LEARNING_RATE})", "noise_multiplier": NOISE_MULTIPLIER,
        "max_grad_norm": MAX_GRAD_NORM, "warmup": args.warmup, "steps": args.steps,
        "tiny": args.tiny, "models": args.models, "seq_lens": args.seq_lens,
        "methods": args.methods, "batch_size": args.batch_size or "per model",
        "dtype": str(args.dtype).split(".")[-1] if args.dtype else "per model",
        "torch_device": str(args.device), "parallel": args.parallel,
        "processes": dist.get_world_size() if dist.is_initialized() else 1,
    }


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS),
                   help=f"default: {' '.join(FULL_MODELS)} (--tiny: {' '.join(TINY_MODELS)})")
    p.add_argument("--seq-lens", nargs="+", type=int,
                   help="language-model sequence lengths; default 128 512 1024 (--tiny: 16)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--batch-size", type=int,
                   help="one batch for every model; default per model (16/8/8/256; --tiny: 4)")
    p.add_argument("--steps", type=int, help="timed steps; default 10 (--tiny: 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first; default 3 (--tiny: 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="one dtype for every model; default per model (Llama bfloat16, else float32)")
    p.add_argument("--device", help="default: cuda if available (--tiny: cpu)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="folder for JSON/PNG")
    p.add_argument("--max-batch", action="store_true",
                   help="also find the largest batch that fits, per cell (CUDA only; slow)")
    p.add_argument("--max-batch-cap", type=int, default=4096, help="stop the search here")
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke run: tiny GPT-2, Llama and ResNet, all methods, in seconds")
    p.add_argument("--fsdp", action="store_true", help="multi-process rows, FSDP2-sharded")
    p.add_argument("--ddp", action="store_true", help="multi-process rows, DDP-wrapped")
    p.add_argument("--nproc", type=int, help="processes for --fsdp/--ddp; default: the number "
                   "of GPUs, or 2 on the CPU")
    args = p.parse_args(argv)
    resolve_defaults(args)
    return args


def resolve_defaults(args) -> None:
    tiny = args.tiny
    args.models = args.models or (TINY_MODELS if tiny else FULL_MODELS)
    args.seq_lens = args.seq_lens or ([16] if tiny else [128, 512, 1024])
    args.batch_size = args.batch_size or (4 if tiny else None)
    args.steps = args.steps or (2 if tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    args.dtype = DTYPES[args.dtype] if args.dtype else None
    args.device_given = args.device is not None
    default_device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    args.device = torch.device(args.device or default_device)
    args.parallel = [mode for mode in ("fsdp", "ddp") if getattr(args, mode)]
    # the baseline runs first so every ratio is against a number of this very run
    args.methods = sorted(dict.fromkeys(args.methods), key=lambda m: m != "nonprivate")


def launch_processes(args, argv) -> int:
    """--fsdp/--ddp outside torchrun: run this script again under torch.distributed.run."""
    import subprocess

    n = args.nproc or (torch.cuda.device_count() if args.device.type == "cuda" else 2)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={n}", __file__, *(sys.argv[1:] if argv is None else argv)]
    return subprocess.call(command)


def init_processes(args) -> None:
    """One process per device (torchrun's environment): nccl and this rank's GPU, or gloo."""
    if args.device.type == "cuda":
        args.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.type == "cuda" else "gloo")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.parallel and "RANK" not in os.environ:
        return launch_processes(args, argv)
    if args.parallel:
        init_processes(args)
        try:
            return run(args)
        finally:
            dist.destroy_process_group()
    return run(args)


def run(args) -> int:
    full_size = [m for m in args.models if m not in TINY_MODELS]
    if args.device.type == "cpu" and full_size and not args.device_given:
        print(f"benchmarks/bench_train.py: no CUDA device; {', '.join(full_size)} would take hours on "
              "the CPU. Use --tiny for a CPU smoke run of the whole pipeline, or --device cpu to "
              "insist.", file=sys.stderr)
        return 2
    if args.max_batch and args.device.type != "cuda":
        print("--max-batch searches for the largest batch before CUDA runs out of memory; "
              "skipped on the CPU", file=sys.stderr)
    quiet_known_warnings()
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the same for every method; tuned during warm-up

    rows = run_matrix(args)
    if not is_main_process():
        return 0

    print(markdown_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.json").write_text(
        json.dumps({"meta": metadata(args), "rows": [asdict(r) for r in rows]}, indent=1))
    save_plot(rows, args.out / "train.png")
    print(f"\nwrote {args.out / 'train.json'} and {args.out / 'train.png'}")
    failed = [r for r in rows if r.status.startswith("error")]
    for r in failed:
        print(f"FAILED {r.model} T={r.seq_len} {r.method}: {r.status}", file=sys.stderr)
    return 1 if failed else 0  # "n/a" (Opacus cannot) and "OOM" are results, not failures


if __name__ == "__main__":
    sys.exit(main())
