"""FSDP2 on CUDA with nccl, one process per GPU (run by benchmarks/gpu_check.sh under torchrun).

The CPU tests (tests/test_fsdp2.py) check FSDP2 with gloo, where FSDP's reduce-scatter runs on the
calling thread. On CUDA it runs on FSDP's own streams, and dpfused reduce-scatters the sums known
after backward through FSDP's post-backward (dpfused/distributed.py): this checks that a private
FSDP2 step on GPUs equals the same private step without FSDP (noise 0, float32), for per_layer and
flat, and that a bf16 MixedPrecisionPolicy run completes with float32 shards. Prints one line per
check and exits 1 on a mismatch.

    torchrun --nproc_per_node 1 benchmarks/bench_fsdp2_cuda.py      # or one per GPU
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.data import DataLoader, TensorDataset

import dpfused

BATCH, SEQ, VOCAB = 8, 32, 128


def _model(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=SEQ, attn_implementation="eager")
    return LlamaForCausalLM(config).to(device).train()


def _data():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH * dist.get_world_size(), SEQ), generator=g)
    return TensorDataset(ids)


def _step(model, device, clipping, sharded):
    engine = dpfused.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(), batch_size=BATCH * dist.get_world_size()),
        noise_multiplier=0.0, max_grad_norm=0.1, clipping=clipping, sampling="cyclic")
    (ids,) = next(iter(loader))
    ids = ids.to(device)
    logits = model(input_ids=ids).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(),
                                             ids[:, 1:].reshape(-1), reduction="none")
    loss.view(len(ids), -1).mean(1).mean().backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {n: (p.full_tensor() if sharded else p).detach().float().cpu()
            for n, p in model.named_parameters()}


def main() -> int:
    cuda = torch.cuda.is_available()  # the CPU (gloo) only for a dry run of the script
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else \
        torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    failed = False
    for clipping in ("per_layer", "flat"):
        base = _model(device)
        plain = copy.deepcopy(base)
        initial = {n: p.detach().float().cpu() for n, p in base.named_parameters()}
        sharded = base
        for layer in sharded.model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        ours = _step(sharded, device, clipping, sharded=True)
        if dist.get_world_size() == 1:  # one process without FSDP sees the same batch
            reference = _step(plain, device, clipping, sharded=False)
            err = max(((ours[n] - reference[n]).norm() / reference[n].norm().clamp_min(1e-12))
                      .item() for n in reference)
            moved = min((ours[n] - initial[n]).norm().item() for n in initial) > 0
            ok = err < 1e-4 and moved
            failed |= not ok
            print(f"fsdp2 {clipping}: max relative difference to no FSDP {err:.2e}, every "
                  f"parameter moved: {moved} {'ok' if ok else 'MISMATCH'}", flush=True)
    model = _model(device)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    params = _step(model, device, "per_layer", sharded=True)
    finite = all(torch.isfinite(v).all() for v in params.values())
    failed |= not finite
    if rank == 0:
        print(f"fsdp2 bf16 MixedPrecisionPolicy: {'ok' if finite else 'NON-FINITE'}", flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
