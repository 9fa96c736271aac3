"""Data parallel training on PyTorch's own engines: DistributedDataParallel (docs/design.md §9).

Every rank draws the same logical batch and keeps its slice (``replicated_generator``); its
examples' norms and clip factors are local. What differs between engines is how the clipped sums of
the ranks are added up and where the noise goes:

- plain module (no wrapper): :class:`ProcessGroupReduction`. One all-reduce of the clipped sums
  (per device and dtype, over a flat buffer) at the release; every rank then adds the SAME noise
  from a replicated generator, as under DDP.
- ``DistributedDataParallel``: :class:`DDPReduction`. DDP's bucketed all-reduce carries the clipped
  sums, through a communication hook that sums (DDP's default averages). A bucket whose parameters'
  groups completed inside backward (``per_layer``'s fast path) is reduced as soon as DDP finds it
  ready, overlapped with the rest of backward; any other bucket (``flat``, tied weights, recomputed
  layers) waits for the end of the pass, when the book-keeper has its sums. Physical batches before
  the last one of a logical batch run without DDP synchronization (``no_sync``). Every rank then holds
  the same global sum and adds the SAME noise, from a generator all ranks share: the released
  gradient carries one N(0, sigma^2 C^2) per coordinate, and the ranks' parameters stay equal.
- FSDP2 (``fully_shard``): :class:`FSDP2Reduction`. Layers see the all-gathered (unsharded)
  parameters; their clipped sums are handed to FSDP as the unsharded gradients, so FSDP's own
  reduce-scatter adds them up (inside backward for groups that complete there, ``per_layer``), and
  each rank noises the shard it owns (``per_rank_generator``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from dpfused import privacy_math
from dpfused.step import ClippedStep, LogicalBatch

__all__ = ["DDPReduction", "FSDP2Reduction", "ProcessGroupReduction", "all_reduce_sum",
           "check_ddp", "check_same_data", "check_sharding", "dataset_fingerprint",
           "drain_torch_threads_at_exit", "is_fsdp2", "narrower_than_float32", "per_rank_generator",
           "reduce_dtype_of", "replicated_generator", "unwrap"]


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


class ProcessGroupReduction:
    """Data parallel over a plain (unwrapped) module: one all-reduce of the clipped sums at the
    release, then the same noise on every rank (its generator is replicated, §9).

    The one data-parallel seam of ``DPOptimizer``: every multi-process path hands it a reduction
    (this one, ``DDPReduction`` or ``FSDP2Reduction``) that adds the ranks' clipped sums and
    counts up before the noise.
    """

    def __init__(self, book) -> None:
        self.book = book

    def begin(self, batch: LogicalBatch) -> None:
        """A loader listener, as the wrappers' reductions are; nothing to prepare here."""

    def global_sums(self, clipped: ClippedStep, params) -> dict[int, torch.Tensor]:
        """sum over ranks of the clipped sums, per parameter, in one all-reduce per device and
        dtype (a rank no example reached contributes zeros)."""
        sums = [clipped.sums.get(id(p), torch.zeros_like(p)) for p in params]
        return {id(p): s for p, s in zip(params, all_reduce_sum(sums))}

    def noised_global_counts(self, counts: torch.Tensor, *, std: float, generator) -> torch.Tensor:
        """Adaptive thresholds: the ranks' counts summed, plus the same N(0, std^2) on every
        rank (the noise generator is replicated)."""
        return privacy_math.noised_counts(all_reduce_sum([counts])[0], std=std,
                                          generator=generator)

    def local_shape(self, param) -> torch.Size:
        return param.shape

    def as_grad(self, param, grad: torch.Tensor) -> torch.Tensor:
        return grad.to(param.dtype)


class DDPReduction(ProcessGroupReduction):
    """Adds the ranks' clipped sums up through DDP's own bucketed all-reduce (module docstring).

    Args:
        ddp: the DistributedDataParallel wrapper.
        book: the book-keeper of the wrapped module's instrumentation.
    """

    def __init__(self, ddp: nn.parallel.DistributedDataParallel, book) -> None:
        self.ddp, self.book = ddp, book
        self.world_size = dist.get_world_size()
        self._deferred: list[tuple[dist.GradBucket, torch.futures.Future]] = []
        self._global: dict[int, torch.Tensor] = {}  # id(param) -> sum over ranks, this batch
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
            self._reduced, self._global = False, {}

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
        """Sum this rank's clipped sums over the ranks (async), in a buffer of dpfused's own; DDP
        gets zeros back, so .grad holds nothing un-noised between backward and the step (a
        clip_grad_norm_ there sees 0 and changes nothing)."""
        params = list(bucket.parameters())
        sums = [self.book.logical_sum(p) for p in params]
        flat = torch.cat([torch.zeros(p.numel(), dtype=bucket.buffer().dtype,
                                      device=bucket.buffer().device) if s is None
                          else s.reshape(-1) for p, s in zip(params, sums)])
        work = dist.all_reduce(flat, group=self.ddp.process_group, async_op=True)

        def keep(_fut):
            for p, chunk in zip(params, flat.split([p.numel() for p in params])):
                self._global[id(p)] = chunk.view(p.shape)
            return bucket.buffer().zero_()

        return work.get_future().then(keep)

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
            sums, self._global = self._global, {}
            return {id(p): sums[id(p)] for p in params}
        return super().global_sums(clipped, params)


# ---- process exit --------------------------------------------------------------------------------
# A torch bug (pytorch/pytorch#190489), not dpfused's: a c10d worker thread (gloo's
# "pt_gloo_runloop") that drops the last reference to a finished collective frees its tensors, and
# a tensor Python still holds (a full_tensor() result, a parameter shard) takes the GIL to
# release its Python object. If the interpreter is already finalizing, CPython ends that thread
# with pthread_exit, whose forced unwind crosses a noexcept destructor: std::terminate, "terminate
# called without an active exception", SIGABRT, although every result was computed. It takes a
# collective within a few milliseconds of the end of the process (the last full_tensor(), then
# destroy_process_group(), then exit): 10-20% of such 2-rank gloo runs, with or without dpfused.
# destroy_process_group() does not stop gloo's threads (the model's FSDP state and meshes keep the
# process group alive). dpfused therefore hands the GIL over at exit, while the interpreter is
# still whole, until torch's worker threads have gone idle.

_EXIT_DRAIN_REGISTERED = False
_DRAIN_QUIET_S, _DRAIN_LIMIT_S = 0.005, 2.0


def drain_torch_threads_at_exit() -> None:
    """Register (once) ``_drain_torch_threads`` to run at interpreter exit (before it finalizes).
    make_private calls it when it runs on several processes."""
    global _EXIT_DRAIN_REGISTERED
    if not _EXIT_DRAIN_REGISTERED:
        import atexit

        atexit.register(_drain_torch_threads)
        _EXIT_DRAIN_REGISTERED = True


def _drain_torch_threads(quiet_s: float = _DRAIN_QUIET_S, limit_s: float = _DRAIN_LIMIT_S) -> None:
    """Release the GIL until no torch worker thread ("pt_*": gloo's run loops, the TCPStore...)
    has been runnable for ``quiet_s``, at most ``limit_s``: a worker finishing a collective's
    clean-up takes the GIL while it is free, runs, and goes back to sleep. Without /proc (not
    Linux), release it for ``limit_s`` / 20."""
    import time

    start = last_busy = time.monotonic()
    while (now := time.monotonic()) - start < limit_s:
        busy = _torch_thread_runnable()
        if busy is None:
            time.sleep(limit_s / 20)
            return
        if busy:
            last_busy = now
        elif now - last_busy >= quiet_s:
            return
        time.sleep(0.0005)  # releases the GIL


def _torch_thread_runnable() -> bool | None:
    """Is a torch worker thread of this process running or runnable (state R)? None if the
    thread states cannot be read (no /proc)."""
    import os

    try:
        threads = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in threads:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # the thread ended
        name, state = stat[stat.find("(") + 1:stat.rfind(")")], stat[stat.rfind(")") + 2:][:1]
        if name.startswith("pt_") and state == "R":
            return True
    return False


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
    """A new generator in rank 0's state on every rank; the caller's is left as it was.

    Used twice: the sampler's (every rank draws the same logical batch and keeps its slice, so
    the union over ranks is the batch the accountant assumes; in secure mode rank 0's ChaCha20
    key) and, under DDP, the noise's (every rank adds the same noise after the reduction, so it
    is added once and the replicas stay equal). ``broadcast_object_list`` carries the state, so
    it works with every backend and for CUDA generators.

    Args:
        generator: a torch.Generator, a ChaCha20Generator, or None: then one seeded from rank
            0's global torch RNG, on ``device``.
        device: where a generator made for ``generator=None`` lives.
    """
    from dpfused.secure_random import ChaCha20Generator

    if generator is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
        generator = torch.Generator(device=device).manual_seed(seed)
    state = [generator.get_state()]
    dist.broadcast_object_list(state, src=0)
    if isinstance(generator, ChaCha20Generator):
        shared = ChaCha20Generator(impl=generator.impl)  # keyed from the OS, then replaced
    else:
        shared = torch.Generator(device=generator.device)
    shared.set_state(state[0])
    return shared


FINGERPRINT_ITEMS = 32  # items hashed per rank by check_same_data: a fixed, seeded sample


def check_same_data(data_loader, **settings) -> None:
    """Every rank must split the SAME logical batches: same dataset, size and sampling settings.

    The dataset's content is compared through a fingerprint (``dataset_fingerprint``): ranks that
    hold different data of the same length (each its own shard) would pass a length check, and
    the batches would then not be sampled from one dataset, which is what the accountant assumes.

    Raises:
        ValueError (on every rank): a rank whose data loader, dataset or settings differ from
            rank 0's.
    """
    mine = {"len(dataset)": len(data_loader.dataset), "batch_size": data_loader.batch_size,
            **settings}
    mine["dataset content"] = "sha256 " + dataset_fingerprint(data_loader.dataset)[:16]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    for rank, theirs in enumerate(every):
        differ = {k: (every[0][k], v) for k, v in theirs.items() if v != every[0][k]}
        if "len(dataset)" in differ:  # the content differs too; the length says it plainly
            differ.pop("dataset content", None)
        if differ:
            details = ", ".join(f"{k}: {a!r} on rank 0, {b!r} on rank {rank}"
                                for k, (a, b) in differ.items())
            fix = (" (each rank holds other items: give every rank the WHOLE dataset, not its "
                   "shard, and no DistributedSampler; dpfused slices each logical batch between "
                   "the ranks itself)" if "dataset content" in differ else "")
            raise ValueError(
                f"rank {rank}'s data loader differs from rank 0's ({details}){fix}; every rank "
                "must pass the same dataset and settings to make_private: each keeps its slice "
                "of one shared logical batch, which is what the accountant assumes")


def dataset_fingerprint(dataset, *, items: int = FINGERPRINT_ITEMS) -> str:
    """A SHA-256 of ``items`` of ``dataset``'s items (a fixed, seeded sample of indices, the
    first and the last among them): equal on ranks that hold the same data, different (but for a
    hash collision) where one of those items differs. Cheap: ``items`` + 2 look-ups.

    Items are hashed canonically: tensors and numpy arrays by dtype, shape and bytes; strings,
    bytes, numbers; tuples, lists and dicts (keys sorted) recursively; PIL images through numpy.
    Another object counts by its type name only (so it never makes equal data look different).
    Random augmentations in ``__getitem__`` draw from torch's, numpy's and Python's global
    generators, seeded alike here (and restored after), so they agree across ranks.
    """
    import hashlib
    import random

    import numpy as np

    n = len(dataset)
    picked = np.random.default_rng(0x5EED).choice(n, size=min(items, n), replace=False)
    indices = sorted({0, n - 1, *map(int, picked)}) if n else []
    digest = hashlib.sha256(f"len={n};".encode())
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            random.seed(0)
            np.random.seed(0)
            for i in indices:
                digest.update(f"item {i};".encode())
                _hash_item(dataset[i], digest)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return digest.hexdigest()


def _hash_item(item, digest) -> None:
    """Feed ``item``'s content into ``digest``, tagged by kind and length (unambiguous)."""
    import numpy as np

    def tagged(kind: str, payload: bytes) -> None:
        digest.update(f"{kind}:{len(payload)}:".encode())
        digest.update(payload)

    if isinstance(item, torch.Tensor):
        item = item.detach().cpu()
        item = (item if item.layout == torch.strided else item.to_dense()).contiguous()
        tagged("tensor", f"{item.dtype}{tuple(item.shape)}".encode())
        tagged("data", item.reshape(-1).view(torch.uint8).numpy().tobytes() if item.numel()
               else b"")
    elif isinstance(item, (np.ndarray, np.generic)):
        array = np.ascontiguousarray(item)
        tagged("ndarray", f"{array.dtype.str}{array.shape}".encode())
        tagged("data", array.tobytes() if array.dtype != object else repr(array).encode())
    elif isinstance(item, (str, bytes, bytearray)):
        tagged(type(item).__name__, item.encode() if isinstance(item, str) else bytes(item))
    elif item is None or isinstance(item, (bool, int, float, complex)):
        tagged(type(item).__name__, repr(item).encode())
    elif isinstance(item, Mapping):
        tagged("dict", str(len(item)).encode())
        for key in sorted(item, key=repr):
            _hash_item(key, digest)
            _hash_item(item[key], digest)
    elif isinstance(item, (list, tuple)):
        tagged(type(item).__name__, str(len(item)).encode())
        for part in item:
            _hash_item(part, digest)
    elif type(item).__module__.startswith("PIL."):
        tagged("image", f"{item.mode}{item.size}".encode())
        tagged("data", np.asarray(item).tobytes())
    else:
        tagged("object", f"{type(item).__module__}.{type(item).__qualname__}".encode())


# ---- FSDP2 ----------------------------------------------------------------------------------------

def is_fsdp2(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def check_sharding(module: nn.Module, *, clipping: str) -> None:
    """Refuse what the FSDP2 reduction cannot do exactly, naming the module and the fix."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor, Shard

    for path, sub in module.named_modules():
        if isinstance(sub, FullyShardedDataParallel):
            raise ValueError(
                f"module '{path or '<root>'}' is wrapped in FullyShardedDataParallel (FSDP1), "
                "which flattens parameters so that no layer sees its own weight; use FSDP2 "
                "(torch.distributed.fsdp.fully_shard) or DistributedDataParallel")
    sharded = [(n, p) for n, p in module.named_parameters() if isinstance(p, DTensor)]
    if not sharded:
        return
    world = dist.get_world_size()
    managed = {id(fp.sharded_param) for fp in _fsdp_params_of(module)}
    for name, p in sharded:
        if (p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),)
                or p.device_mesh.size() != world or id(p) not in managed):
            raise ValueError(
                f"parameter '{name}' is a DTensor placed {tuple(p.placements)} on a "
                f"{p.device_mesh.ndim}-d mesh of {p.device_mesh.size()} ranks"
                f"{'' if id(p) in managed else ', not managed by fully_shard'}: only FSDP2's "
                "Shard(0) over all ranks of the default group is supported (tensor parallelism "
                "and HSDP meshes are not); shard with fully_shard over the default group")
    if not is_fsdp2(module):
        raise ValueError(
            f"parameter '{sharded[0][0]}' is a DTensor but the module passed to make_private is "
            "not an FSDP2 module: apply fully_shard to the root too (blocks first, then the root)")
    if clipping == "per_device":
        raise ValueError(
            "clipping='per_device' on an FSDP2-sharded model: per_device clips the parameters "
            "each device holds (He et al., a model split across devices), but every FSDP rank "
            "holds a shard of every layer, so a device's group would be a slice of each layer; "
            "use clipping='per_layer' or 'flat'")
    _check_reduce_precision(module)


_MIXED_PRECISION_FIX = ("keep float32 parameters (model.float() before fully_shard) and compute "
                        "in bfloat16 through fully_shard(..., mp_policy=MixedPrecisionPolicy("
                        "param_dtype=torch.bfloat16, reduce_dtype=torch.float32))")


def _check_reduce_precision(module: nn.Module) -> None:
    """FSDP2 reduce-scatters the clipped sums and writes them into the sharded ``.grad`` in the
    parameters' dtype, all before dpfused adds the noise: a rounding there is a rounding of the
    sum over the batch (one example can flip it by an ulp of the SUM, far more than C). Refuse a
    reduce dtype or a parameter dtype narrower than float32. A reduce dtype left unset (bf16
    compute, ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``) is fine: dpfused hands FSDP
    float32 sums, and FSDP reduces in the gradients' dtype (``FSDP2Reduction._hand_over``)."""
    names = {id(p): n for n, p in module.named_parameters()}
    for group in _fsdp_param_groups(module):
        policy = group.mp_policy
        for fsdp_param in group.fsdp_params:
            param = fsdp_param.sharded_param
            if not param.requires_grad:
                continue  # frozen (LoRA's base weights): never reduced
            for what, dtype in (("parameter", param.dtype), ("reduce", reduce_dtype_of(policy))):
                if dtype is not None and dtype.is_floating_point and narrower_than_float32(dtype):
                    raise ValueError(
                        f"parameter '{names.get(id(param), tuple(param.shape))}' has the "
                        f"{what} dtype {dtype} under fully_shard: FSDP would reduce-scatter the "
                        f"clipped sums or store them in {dtype}, rounding the sum over the batch "
                        "before the noise "
                        "(one example could then move it by far more than max_grad_norm); "
                        f"{_MIXED_PRECISION_FIX}")


def reduce_dtype_of(policy) -> torch.dtype | None:
    """The dtype FSDP2 reduce-scatters in under a MixedPrecisionPolicy, None for the gradients'
    own. FSDP's rule (FSDPParam.init_dtype_attrs, run at the first forward): a reduce dtype equal
    to the compute dtype means "none"."""
    reduce = getattr(policy, "reduce_dtype", None)
    return None if reduce == getattr(policy, "param_dtype", None) else reduce


def narrower_than_float32(dtype: torch.dtype) -> bool:
    """A floating dtype with less precision than float32 (bf16, fp16, fp8): FSDP must not reduce
    or store the clipped sums in it before the noise (§9)."""
    return torch.finfo(dtype).eps > torch.finfo(torch.float32).eps


def _fsdp_param_groups(root: nn.Module):
    """FSDP2's FSDPParamGroup of every fully_shard unit under ``root`` (private API)."""
    for module in root.modules():
        if is_fsdp2(module):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None:
                yield group


def _fsdp_params_of(root: nn.Module):
    """FSDP2's FSDPParam of every parameter fully_shard manages under ``root`` (private API)."""
    for group in _fsdp_param_groups(root):
        yield from group.fsdp_params


class FSDP2Reduction:
    """FSDP2: FSDP's own reduce-scatter adds the ranks' clipped sums up, and each rank adds noise
    to the shard it owns alone, from its own stream: every coordinate gets std sigma C once.

    Layers see the all-gathered (unsharded) parameters and form full-shape clipped sums, exactly
    as on one process. On the last physical batch of a logical batch, each sum is handed to FSDP
    as the unsharded parameter's gradient (the logical sum: earlier physical batches included),
    at the start of the post-backward of its FSDP unit (``_post_backward``), which reduces it at
    once:

    - a group that completes inside backward (the ``per_layer`` fast path) is handed over by its
      unit's own post-backward, so FSDP's reduce-scatter of that unit carries it, overlapped with
      the rest of backward: no unclipped gradient, no collective of dpfused's own;
    - every other sum (``flat``, tied weights, recomputed layers) is known only at the end of the
      pass; it is reduced then by the same FSDP machinery (the unit's post-backward, run once
      more), in one reduce-scatter per unit.

    Nothing un-noised is ever readable in a ``.grad``: a handed-over sum lives in the unsharded
    gradient only inside the post-backward that consumes it, and the reduced shard is taken out
    of the sharded ``.grad`` as FSDP writes it (a post-accumulate-grad hook) and kept here until
    the release. A backward that fails half way (a non-finite norm, an exception of the user's)
    therefore leaves no sum behind; its partial reductions are dropped when the next pass starts.

    FSDP reduces with a plain sum (divide factor 1), in float32 or wider
    (``_check_reduce_precision``). Earlier physical batches are not reduced
    (``set_requires_gradient_sync(False)``, FSDP's no_sync): the book keeps their sums. An
    autograd gradient on an unsharded parameter is a parameter used outside its module, and one
    on a sharded parameter a parameter used outside forward: the pass fails (tensor hooks).

    Args:
        root: the FSDP2 root module.
        book: its instrumentation's book-keeper.
    """

    def __init__(self, root: nn.Module, book) -> None:
        self.root, self.book = root, book
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._fsdp_param = {id(fp.sharded_param): fp for fp in _fsdp_params_of(root)}
        self._unit_of = {id(fp.sharded_param): group for group in _fsdp_param_groups(root)
                         for fp in group.fsdp_params}
        self._private = [p for g in book.groups for p in g.params]
        self._private_of_unit: dict[int, list[nn.Parameter]] = {}
        for p in self._private:
            self._private_of_unit.setdefault(id(self._unit_of[id(p)]), []).append(p)
        self._sharded: dict[int, nn.Parameter] = {}
        self._watched: set[int] = set()  # unsharded parameters with the leak hook
        self._ready: set[int] = set()  # private parameters whose sum is final, this pass
        self._handed: set[int] = set()  # private parameters handed to FSDP in this pass
        self._reducing = False  # inside FSDP's post-backward: .grad is written by its reduction
        self._synced = False  # this pass is the logical batch's last: FSDP reduces it
        self._reduced = False  # the logical batch's sums were reduce-scattered
        self._global: dict[int, torch.Tensor] = {}  # id(param) -> this rank's shard of the sum
        self.units_reduced_after_backward = 0
        for module in root.modules():
            if is_fsdp2(module):
                module.set_gradient_divide_factor(1.0)  # a sum of clipped sums, not FSDP's mean
                module.set_force_sum_reduction_for_comms(True)  # ReduceOp.SUM (gloo has no premul)
        for unit in _fsdp_param_groups(root):
            unit.post_backward = functools.partial(self._post_backward, unit, unit.post_backward)
        for param in self._private:
            param.register_post_accumulate_grad_hook(self._take_reduced)
        root.set_requires_gradient_sync(False)
        book.resolve_param = self.sharded_of
        book.leak_checked_params = ()  # .grad is FSDP's; see _watch_unsharded, _take_reduced
        book.pass_start_listeners.append(self._start_pass)
        book.group_complete_listeners.append(self._mark_ready)
        book.pass_end_listeners.append(self._reduce_rest)
        root.register_forward_hook(self._watch_unsharded)

    # ---- a logical batch --------------------------------------------------------------------------
    def begin(self, batch: LogicalBatch) -> None:
        """Loader listener: FSDP reduces the logical batch's last physical batch only."""
        self._synced = batch.is_last_physical
        self.root.set_requires_gradient_sync(self._synced)
        if batch.is_last_physical:
            self._reduced, self._global = False, {}

    def _start_pass(self) -> None:
        """Book listener, a backward pass starts: forget what an earlier pass that failed half
        way handed over or reduced (the book forgets its sums too)."""
        self._ready, self._handed = set(), set()
        if self._synced:
            self._reduced, self._global = False, {}

    def _mark_ready(self, g: int) -> None:
        """Book listener, a group completed inside backward: its unit's post-backward (next)
        hands its sums over."""
        if self._synced:
            self._ready.update(id(p) for p in self.book.groups[g].params)

    def _post_backward(self, unit, fsdp_post_backward, *args) -> None:
        """FSDP's post-backward of ``unit``, preceded by the hand-over of its private parameters'
        final sums: they sit in the unsharded gradients only until FSDP consumes them here."""
        if self._synced:
            for param in self._private_of_unit.get(id(unit), ()):
                if id(param) in self._ready and id(param) not in self._handed:
                    self._hand_over(param)
        self._reducing = True
        try:
            fsdp_post_backward(*args)
        finally:
            self._reducing = False

    def _hand_over(self, param) -> None:
        """Make ``param``'s logical sum the gradient FSDP reduce-scatters next, in the reduce
        dtype if one is set, else in the (float32 or wider, ``_check_reduce_precision``) dtype of
        the sharded parameter: never in a bf16 compute dtype. A dtype other than the unsharded
        parameter's goes where FSDP keeps gradients in the reduce dtype; FSDP reduces in the
        gradients' dtype when no reduce dtype is set, so the sum is never rounded to bf16."""
        fsdp_param = self._fsdp_param[id(param)]
        unsharded = getattr(fsdp_param, "_unsharded_param", None)
        if unsharded is None:
            return  # its unit never ran forward: no gradient, zeros at the release
        if not self._handed:
            self._check_grads_cleared()
        total = self.book.logical_sum(param)
        dtype = fsdp_param.reduce_dtype or fsdp_param.orig_dtype
        grad = (torch.zeros(unsharded.shape, dtype=dtype, device=unsharded.device)
                if total is None else total.to(dtype))
        if dtype == unsharded.dtype:
            unsharded.grad = grad
        else:
            fsdp_param.unsharded_accumulated_grad = grad
        self._handed.add(id(param))

    def _take_reduced(self, param) -> None:
        """Post-accumulate-grad hook of a private sharded parameter. Inside FSDP's post-backward:
        its reduction just wrote this rank's shard of the sum into ``.grad``; keep it here until
        the release (added up: FSDP accumulates). Elsewhere autograd wrote it: the parameter was
        used outside forward (where it is sharded), which dpfused cannot clip."""
        grad, param.grad = param.grad, None
        if not self._reducing:
            self.book.fail_autograd_gradient(1, param.shape)
        local = grad.to_local()
        kept = self._global.get(id(param))
        self._global[id(param)] = local if kept is None else kept + local

    def _check_grads_cleared(self) -> None:
        """FSDP adds its reduce-scatter into an existing sharded ``.grad``: a gradient left from
        the last step (or set by hand) would be released again."""
        if any(p.grad is not None and bool(p.grad.to_local().any()) for p in self._private):
            self.book.fail_autograd_gradient(
                sum(p.grad is not None for p in self._private),
                next(p.shape for p in self._private if p.grad is not None))

    def _reduce_rest(self) -> None:
        """End of a backward pass (book listener, after FSDP's own end-of-backward): reduce-scatter
        the sums completed at the end of the pass, unit by unit (their unit's post-backward, run
        again). Every rank hands over the same parameters (zeros where it has no sum), so the
        units' reduce-scatters match across ranks."""
        if not self._synced or self.book.pass_failed:
            return
        self._ready.update(id(p) for p in self._private)
        pending = [p for p in self._private if id(p) not in self._handed
                   and getattr(self._fsdp_param[id(p)], "_unsharded_param", None) is not None]
        units = list({id(self._unit_of[id(p)]): self._unit_of[id(p)] for p in pending}.values())
        _reduce_scatter_units(units)
        self.units_reduced_after_backward += len(units)
        self._reduced = True
        for param in self._private:  # not taken by _take_reduced (a torch without the hook call)
            if param.grad is not None:
                self._reducing = True
                try:
                    self._take_reduced(param)
                finally:
                    self._reducing = False

    def _watch_unsharded(self, _module, _inputs, _output) -> None:
        """Root forward hook: watch each unsharded parameter (FSDP creates them at the first
        all-gather) for an autograd gradient, which dpfused's layers never produce."""
        for param in self._private:  # frozen parameters (LoRA's base weights) need no watch
            fsdp_param = self._fsdp_param[id(param)]
            key = id(param)
            if key in self._watched or not hasattr(fsdp_param, "_unsharded_param"):
                continue
            fsdp_param.unsharded_param.register_hook(self._refuse_autograd_gradient)
            self._watched.add(key)

    def _refuse_autograd_gradient(self, grad: torch.Tensor | None) -> None:
        # Called with None when autograd visits the parameter without a gradient (dpfused's
        # layers return none for their weights).
        if grad is not None and bool(grad.any()):
            self.book.fail_autograd_gradient(1, grad.shape)

    # ---- the release ------------------------------------------------------------------------------
    def sharded_of(self, unsharded: torch.Tensor) -> nn.Parameter | None:
        """The sharded parameter whose all-gathered form ``unsharded`` is (FSDP2's FSDPParam)."""
        if id(unsharded) not in self._sharded:
            for fsdp_param in self._fsdp_param.values():
                if getattr(fsdp_param, "_unsharded_param", None) is unsharded:
                    self._sharded[id(unsharded)] = fsdp_param.sharded_param
        return self._sharded.get(id(unsharded))

    def local_shape(self, param) -> torch.Size:
        return param.to_local().shape

    def global_sums(self, clipped: ClippedStep, params) -> dict[int, torch.Tensor]:
        """This rank's shard of the sum over ranks of the clipped sums, per parameter: what FSDP's
        reduce-scatter wrote into the sharded ``.grad`` (kept aside since, zeros if none)."""
        if clipped.batch.logical_size > 0 and not self._reduced:
            raise RuntimeError(
                "the logical batch's last physical batch was not reduced over the ranks: under "
                "FSDP2 every rank must run forward and backward on each of its physical batches "
                "(FSDP's collectives wait for all ranks)")
        reduced, self._global = self._global, {}
        return {id(p): reduced.get(id(p), torch.zeros(self.local_shape(p), dtype=p.dtype,
                                                      device=p.to_local().device))
                for p in params}

    def noised_global_counts(self, counts: torch.Tensor, *, std: float, generator) -> torch.Tensor:
        """Adaptive thresholds: each rank noises its counts from its own stream with std /
        sqrt(world) and the all-reduce adds them up: N(0, std^2) once, the same noisy counts (so
        the same next thresholds) on every rank."""
        share = privacy_math.noise_std_of_rank_share(std, world_size=self.world_size)
        return all_reduce_sum([privacy_math.noised_counts(counts, std=share,
                                                          generator=generator)])[0]

    def as_grad(self, param, local_grad: torch.Tensor):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local_grad.to(param.dtype), param.device_mesh, param.placements,
                                  shape=param.shape, stride=param.stride())


def _reduce_scatter_units(units) -> None:
    """Run FSDP2's post-backward (its reduce-scatter of the unsharded gradients into the sharded
    ``.grad``, accumulating) for ``units`` after FSDP's own end of backward, and wait for it."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    for unit in reversed(units):  # the order FSDP itself reduces in: last unit first
        unit.post_backward()
    for unit in units:
        unit._training_state = TrainingState.IDLE
        unit.finalize_backward()
    if units:
        states = units[0].comm_ctx.reduce_scatter_states
        for state in states:
            if state.event is not None:
                torch.accelerator.current_stream().wait_event(state.event)
        states.clear()


def per_rank_generator(generator, device: torch.device):
    """FSDP2: each rank noises its own shard, from a stream of its own. Reproducible: the ranks'
    seeds are spawned (numpy SeedSequence) from one base seed, rank 0's (from ``generator`` or
    torch's global RNG), so they differ per rank and are fixed by the user's seed. A secure
    generator (ChaCha20, keyed from each rank's OS) is independent per rank already."""
    import numpy as np

    from dpfused.secure_random import ChaCha20Generator

    if isinstance(generator, ChaCha20Generator):
        return generator
    draw = {"generator": generator} if generator is not None else {}
    if generator is not None:
        draw["device"] = generator.device
    base = [int(torch.randint(0, 2**62, (1,), **draw).item())]
    dist.broadcast_object_list(base, src=0)
    child = np.random.SeedSequence(base[0]).spawn(dist.get_world_size())[dist.get_rank()]
    seed = int(child.generate_state(1, np.uint64)[0] >> 1)
    gen_device = generator.device if generator is not None else device
    return torch.Generator(device=gen_device).manual_seed(seed)
