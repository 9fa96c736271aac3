"""Data parallel training on PyTorch's own engines: DistributedDataParallel (docs/design.md §9).

Every rank draws the same logical batch and keeps its slice (``engine._shared_generator``); its
examples' norms and clip factors are local. What differs between engines is how the clipped sums of
the ranks are added up and where the noise goes:

- plain module (no wrapper): the optimizer all-reduces the noised sums after backward; rank 0 alone
  adds noise (``privacy_math.noise_std_on_rank``). Unchanged, no class here.
- ``DistributedDataParallel``: :class:`DDPReduction`. DDP's bucketed all-reduce carries the clipped
  sums, through a communication hook that sums (DDP's default averages). A bucket whose parameters'
  groups completed inside backward (``per_layer``'s fast path) is reduced as soon as DDP finds it
  ready, overlapped with the rest of backward; any other bucket (``flat``, tied weights, recomputed
  layers) waits for the end of the pass, when the book-keeper has its sums. Physical batches before
  the last one of a logical batch run without DDP synchronization (``no_sync``). Every rank then holds
  the same global sum and adds the SAME noise, from a generator all ranks share: the released
  gradient carries one N(0, sigma^2 C^2) per coordinate, and the ranks' parameters stay equal.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from dpfused.step import ClippedStep, LogicalBatch

__all__ = ["DDPReduction", "all_reduce_sum", "check_ddp", "replicated_generator", "unwrap"]


def unwrap(module: nn.Module) -> nn.Module:
    """The module dpfused instruments: the model inside a DDP wrapper, else ``module`` itself."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return module.module
    return module


def check_ddp(ddp: nn.parallel.DistributedDataParallel) -> None:
    """Refuse DDP configurations the reduction cannot be exact with (before anything changes)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("module is a DistributedDataParallel but torch.distributed is not "
                         "initialized; call torch.distributed.init_process_group first")
    if ddp.process_group is not dist.group.WORLD and dist.get_world_size(ddp.process_group) != \
            dist.get_world_size():
        raise ValueError(
            "module is a DistributedDataParallel over a process group smaller than the default "
            "group; dpfused splits each logical batch over all ranks of the default group. Wrap "
            "it over the default group")
    if getattr(ddp, "_delay_all_reduce_all_params", False) or getattr(ddp, "static_graph", False):
        raise ValueError(
            "module is a DistributedDataParallel with static_graph=True; dpfused's reduction "
            "needs DDP's per-bucket hooks. Construct it with static_graph=False (the default)")
    if ddp.mixed_precision is not None:
        raise ValueError("DistributedDataParallel(mixed_precision=...) is not supported: the "
                         "clipped sums must be reduced in the parameters' dtype; drop it")


class DDPReduction:
    """Adds the ranks' clipped sums up through DDP's own bucketed all-reduce (module docstring).

    Args:
        ddp: the DistributedDataParallel wrapper.
        book: the book-keeper of the wrapped module's instrumentation.
    """

    def __init__(self, ddp: nn.parallel.DistributedDataParallel, book) -> None:
        self.ddp, self.book = ddp, book
        self.world_size = dist.get_world_size()
        self._deferred: list[tuple[dist.GradBucket, torch.futures.Future]] = []
        self._synced = False  # this logical batch's last physical batch goes through DDP
        self._reduced = False  # DDP's hook ran for this logical batch
        self.buckets_overlapped = self.buckets_deferred = 0  # reduced during / after backward
        # Buffers: broadcast once by make_private (they are not trained, and a data-dependent
        # buffer would be released without noise); DDP's per-forward broadcast would make ranks
        # with different numbers of physical batches wait on each other.
        ddp.forward_sync_buffers = False
        ddp.register_comm_hook(state=None, hook=self._comm_hook)
        book.pass_end_listeners.append(self._flush_deferred)

    # ---- a logical batch --------------------------------------------------------------------------
    def begin(self, batch: LogicalBatch) -> None:
        """Loader listener: DDP synchronizes the logical batch's last physical batch only, and only
        when every rank's slice is non-empty (a rank with no example may skip backward)."""
        self._synced = batch.is_last_physical and batch.logical_size >= self.world_size
        self.ddp.require_backward_grad_sync = self._synced
        if batch.is_last_physical:
            self._reduced = False

    def _comm_hook(self, _state, bucket):  # no annotations: DDP checks them as types, not strings
        self._reduced = True
        if all(self.book.is_final(p) for p in bucket.parameters()):
            self.buckets_overlapped += 1
            return self._all_reduce(bucket)  # per_layer fast path: overlaps the rest of backward
        self.buckets_deferred += 1
        future = torch.futures.Future()
        self._deferred.append((bucket, future))
        return future

    def _flush_deferred(self) -> None:
        """End of a backward pass (book-keeper listener): reduce the buckets that waited for it."""
        deferred, self._deferred = self._deferred, []
        for bucket, future in deferred:
            self._all_reduce(bucket).then(lambda fut, future=future: future.set_result(fut.value()))

    def _all_reduce(self, bucket: dist.GradBucket) -> torch.futures.Future:
        """Write this rank's clipped sums into the bucket and sum it over the ranks (async)."""
        buffer = bucket.buffer()
        offset = 0
        for param in bucket.parameters():
            n = param.numel()
            total = self.book.logical_sum(param)
            view = buffer[offset:offset + n]
            if total is None:
                view.zero_()
            else:
                view.copy_(total.reshape(-1))
            offset += n
        work = dist.all_reduce(buffer, group=self.ddp.process_group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    # ---- the release ------------------------------------------------------------------------------
    def global_sums(self, clipped: ClippedStep, params) -> dict[int, torch.Tensor]:
        """sum over ranks of the clipped sums, per parameter: DDP's reduction (now in ``p.grad``),
        or one all-reduce here when DDP did not synchronize this logical batch."""
        if self._synced:
            if not self._reduced:
                raise RuntimeError(
                    "the last physical batch of this logical batch went through backward without "
                    "DDP synchronizing it: call the DistributedDataParallel module (not the module "
                    "inside it) in the forward pass")
            return {id(p): p.grad for p in params}
        sums = [clipped.sums.get(id(p), torch.zeros_like(p)) for p in params]
        return {id(p): s for p, s in zip(params, all_reduce_sum(sums))}

    def global_counts(self, counts: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum([counts])[0]


def all_reduce_sum(tensors):
    """Sum each tensor over all ranks with one collective per device and dtype (flat buffers)."""
    by_device = {}
    for i, t in enumerate(tensors):
        by_device.setdefault((t.device, t.dtype), []).append(i)
    out = list(tensors)
    for indices in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])
        dist.all_reduce(flat)
        for i, chunk in zip(indices, flat.split([tensors[i].numel() for i in indices])):
            out[i] = chunk.view_as(tensors[i])
    return out


def replicated_generator(generator, device: torch.device):
    """A noise generator in the same state on every rank (rank 0's): every rank draws the same
    noise after the sums are reduced, so it is added once and the replicas stay equal.

    ``generator`` None: seeded from rank 0's global torch RNG, on ``device``.
    """
    if generator is None:
        seed = [int(torch.randint(0, 2**62, (1,)).item())]
        dist.broadcast_object_list(seed, src=0)
        return torch.Generator(device=device).manual_seed(seed[0])
    state = [generator.get_state()]
    dist.broadcast_object_list(state, src=0)
    generator.set_state(state[0])
    return generator

