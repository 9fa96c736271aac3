"""The DP data loader: physical batches of the logical batches a DP batch sampler draws.

Each physical batch comes with its :class:`~dpfused.step.LogicalBatch` (the sampling facts of its
logical batch and its place in it), handed to the loader's listeners before the batch is yielded.
``max_physical_batch_size`` splits a logical batch for memory; data parallel ranks each keep their
slice of every logical batch (docs/design.md §9).
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)
from torch.utils.data._utils.collate import default_collate, default_convert

from dpfused.arguments import (
    check_choice,
    check_data_loader,
    check_integer,
    check_map_style_dataset,
    check_max_batch_size,
    check_partitions_given,
)
from dpfused.sampling.collate import EmptySafeCollate
from dpfused.sampling.samplers import (
    SAMPLINGS,
    CyclicBatchSampler,
    CyclicPoissonBatchSampler,
    PoissonBatchSampler,
    ShuffleBatchSampler,
    _DPBatchSampler,
    poisson_rate_of_batch_size,
)
from dpfused.step import LogicalBatch, expected_batch_size

__all__ = ["DPDataLoader", "make_private_data_loader"]

# ---------------------------------------------------------------------------------------------
# Physical batches
# ---------------------------------------------------------------------------------------------


class _PhysicalBatchSampler(Sampler[list[int]]):
    """Splits each logical batch into physical chunks and queues each chunk's info.

    Runs in the main process (DataLoader draws indices there, also with workers), ahead of
    consumption by up to the prefetch depth; batches come back in order, so the loader pops the
    infos FIFO. Each ``iter`` gets a fresh queue so an abandoned iteration leaves nothing stale.
    """

    def __init__(self, logical: _DPBatchSampler, max_physical_batch_size: int | None,
                 rank: int = 0, world_size: int = 1, lockstep: bool = False) -> None:
        self.logical = logical
        self.max_physical_batch_size = max_physical_batch_size
        self.rank, self.world_size = rank, world_size
        self.lockstep = lockstep
        self.first_step = 0
        self.infos: deque[LogicalBatch] = deque()

    def __len__(self) -> int:
        return len(self.logical)

    def __iter__(self) -> Iterator[list[int]]:
        self.infos = deque()
        return self._generate(self.infos, self.first_step)

    def _generate(self, infos: deque, step: int) -> Iterator[list[int]]:
        # Data parallel: every rank draws the same logical batch (the engine gives all ranks one
        # sampler seed) and keeps its slice ``batch[rank::world_size]``, so the union over ranks is
        # the logical batch the accountant sees; ``logical_size`` stays global.
        k = self.max_physical_batch_size
        for batch in self.logical:
            position = self.logical.position - 1
            truncated = bool(getattr(self.logical, "last_truncated", False))  # of this batch
            share = batch[self.rank :: self.world_size]
            chunks = self._split(share, len(batch))
            for j, chunk in enumerate(chunks):
                padding = 0
                if self.lockstep and not chunk and batch:
                    chunk, padding = [batch[0]], 1  # run, weighted 0 (LogicalBatch.padding)
                infos.append(LogicalBatch(
                    sampling=self.logical.sampling,
                    sample_rate=getattr(self.logical, "sample_rate", None),
                    batch_size=getattr(self.logical, "batch_size", None),
                    num_samples=self.logical.num_samples,
                    step=step,
                    epoch=self.logical.epoch,
                    position_in_epoch=position,
                    batches_per_epoch=self.logical.batches_per_epoch,
                    logical_size=len(batch),
                    local_size=len(share),
                    physical_size=len(chunk),
                    is_last_physical=j == len(chunks) - 1,
                    padding=padding,
                    partitions=getattr(self.logical, "partitions", None),
                    max_batch_size=getattr(self.logical, "max_batch_size", None),
                    truncated=truncated,
                ))
                yield chunk
            step += 1

    def _split(self, share: list[int], logical_size: int) -> list[list[int]]:
        """Physical batches of at most k examples. ``lockstep`` (FSDP2, whose collectives need
        every rank to run the same number of forwards and backwards): every rank makes as many
        as the largest share needs, ``ceil(ceil(logical_size / world_size) / k)``, known to all
        ranks from the shared logical batch, and spreads its share evenly over them (a rank
        whose share is smaller may run out: it then runs a padding example, see ``_generate``)."""
        k = self.max_physical_batch_size
        if k is None or not share and not self.lockstep:
            return [share]  # an empty share is one empty physical batch
        if not self.lockstep:
            return [share[i : i + k] for i in range(0, len(share), k)]
        largest_share = -(-logical_size // self.world_size)
        count = max(1, -(-largest_share // k))
        size, extra = divmod(len(share), count)
        bounds = [0]
        for j in range(count):
            bounds.append(bounds[-1] + size + (j < extra))
        return [share[a:b] for a, b in zip(bounds, bounds[1:])]


# ---------------------------------------------------------------------------------------------
# Data loader
# ---------------------------------------------------------------------------------------------


class DPDataLoader:
    """A DataLoader over a DP batch sampler, yielding physical batches.

    Iterating yields one epoch (the rest of the current one after a resume). Just before each
    batch is yielded, its :class:`~dpfused.step.LogicalBatch` is handed to every listener (the
    engine registers the book-keeper's) and kept in ``current`` for the user. A logical batch counts
    as consumed when its last physical batch is yielded; ``state_dict`` records the consumed
    position, so save checkpoints between logical steps.

    ``len()`` is the number of logical batches per epoch (with ``max_physical_batch_size`` the
    number of physical batches varies). ``truncated_batches`` counts the logical batches consumed
    that truncated Poisson sampling cut to ``max_batch_size`` (a function of the sampler's coins,
    as private as the batch sizes: for the trainer's eyes, not for release; the public rate is
    ``privacy_math.truncation_probability``).

    Args:
        dataset: a map-style dataset.
        batch_sampler: a :class:`PoissonBatchSampler`, :class:`CyclicPoissonBatchSampler`,
            :class:`CyclicBatchSampler` or :class:`ShuffleBatchSampler` over ``len(dataset)``
            examples.
        max_physical_batch_size: split logical batches into physical ones of at most this size.
        collate_fn: as for DataLoader (default ``default_collate``); empty batches are handled.
        rank, world_size: data parallel: this process keeps ``batch[rank::world_size]``.
        lockstep: every rank yields the same number of physical batches per logical batch
            (FSDP2's collectives need it); a rank with a smaller share may get an empty one.
        **data_loader_kwargs: num_workers, pin_memory, timeout, worker_init_fn, ... passed on to
            ``torch.utils.data.DataLoader``.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_sampler: _DPBatchSampler,
        max_physical_batch_size: int | None = None,
        collate_fn: Callable[[list], Any] | None = None,
        rank: int = 0,
        world_size: int = 1,
        lockstep: bool = False,
        **data_loader_kwargs: Any,
    ) -> None:
        check_map_style_dataset(dataset, name="DPDataLoader's dataset")
        if not isinstance(batch_sampler, _DPBatchSampler):
            raise TypeError(
                "batch_sampler must be a PoissonBatchSampler, CyclicBatchSampler or "
                f"ShuffleBatchSampler; got {type(batch_sampler).__name__}."
            )
        if batch_sampler.num_samples != len(dataset):
            raise ValueError(
                f"batch_sampler covers {batch_sampler.num_samples} examples but the dataset has "
                f"{len(dataset)}."
            )
        if not data_loader_kwargs.get("in_order", True):
            raise ValueError(
                "in_order=False would return batches out of order and desynchronise "
                "DPDataLoader.current from the batches; use in_order=True."
            )
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.collate_fn = EmptySafeCollate(collate_fn or default_collate, dataset)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size}).")
        self.rank, self.world_size = rank, world_size
        self._physical = _PhysicalBatchSampler(batch_sampler, None, rank, world_size, lockstep)
        self.max_physical_batch_size = max_physical_batch_size
        self.data_loader = DataLoader(
            dataset,
            batch_sampler=self._physical,
            collate_fn=self.collate_fn,
            **data_loader_kwargs,
        )
        self.current: LogicalBatch | None = None
        self._listeners: list[Callable[[LogicalBatch], None]] = []
        self._step = 0  # logical steps consumed
        self._start: dict[str, Any] | None = None  # sampler state when the running epoch began
        self._consumed = 0  # logical batches of that epoch consumed
        self.truncated_batches = 0  # logical batches consumed that truncation cut (see above)

    # -- properties ------------------------------------------------------------------------------
    @property
    def sampling(self) -> str:
        return self.batch_sampler.sampling

    @property
    def sample_rate(self) -> float | None:
        """q for Poisson sampling, else None."""
        return getattr(self.batch_sampler, "sample_rate", None)

    @property
    def batch_size(self) -> int | None:
        """The fixed logical batch size (cyclic/shuffle), else None."""
        return getattr(self.batch_sampler, "batch_size", None)

    @property
    def partitions(self) -> int | None:
        """Cyclic Poisson: the number of partitions b, else None."""
        return getattr(self.batch_sampler, "partitions", None)

    @property
    def max_batch_size(self) -> int | None:
        """Truncated Poisson: K, else None."""
        return getattr(self.batch_sampler, "max_batch_size", None)

    @property
    def num_samples(self) -> int:
        return self.batch_sampler.num_samples

    @property
    def expected_batch_size(self) -> float:
        """q N (Poisson) or b (cyclic/shuffle): the expected logical batch, over all ranks."""
        return expected_batch_size(sampling=self.sampling, sample_rate=self.sample_rate,
                                   num_samples=self.num_samples, batch_size=self.batch_size,
                                   max_batch_size=self.max_batch_size)

    @property
    def max_physical_batch_size(self) -> int | None:
        """Physical batches hold at most this many examples (None: whole logical batches)."""
        return self._physical.max_physical_batch_size

    @max_physical_batch_size.setter
    def max_physical_batch_size(self, value: int | None) -> None:
        # Takes effect at the next iteration (BatchMemoryManager sets it before the loop).
        if value is not None:
            value = check_integer("max_physical_batch_size", value)
        self._physical.max_physical_batch_size = value

    @property
    def batches_per_epoch(self) -> int:
        return self.batch_sampler.batches_per_epoch

    @property
    def drop_last(self) -> bool | None:
        """drop_last of cyclic/shuffle sampling, else None."""
        return getattr(self.batch_sampler, "drop_last", None)

    @property
    def num_workers(self) -> int:
        return self.data_loader.num_workers

    @property
    def step(self) -> int:
        """Logical steps consumed so far (the ``step`` of the next logical batch)."""
        return self._step

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def listeners(self) -> tuple[Callable[[LogicalBatch], None], ...]:
        return tuple(self._listeners)

    def add_listener(self, listener: Callable[[LogicalBatch], None]) -> None:
        """Call ``listener(batch)`` with the LogicalBatch of every physical batch, before it is
        yielded (the engine passes each one to the book-keeper this way)."""
        self._listeners.append(listener)

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        # Rewind the sampler to what was consumed: prefetching may have drawn further.
        if self._start is not None:
            self.batch_sampler.load_state_dict(self._sampler_state())
        self._start = self.batch_sampler.state_dict()
        self._consumed = self._start["position"]
        self._physical.first_step = self._step
        batches = iter(self.data_loader)  # draws from the sampler start here (prefetch)
        return self._generate(batches, self._physical.infos)

    def _generate(self, batches: Iterator[Any], infos: deque) -> Iterator[Any]:
        for batch in batches:
            info = infos.popleft()
            if info.is_last_physical:
                self._consumed = info.position_in_epoch + 1
                self._step = info.step + 1
                self.truncated_batches += info.truncated
            self.current = info
            for listener in self._listeners:
                listener(info)
            yield batch

    # -- checkpointing ---------------------------------------------------------------------------
    def _sampler_state(self) -> dict[str, Any]:
        if self._start is None:
            return self.batch_sampler.state_dict()
        if self._consumed < self.batches_per_epoch:
            return {**self._start, "position": self._consumed}
        sampler = self.batch_sampler
        if sampler.epoch == self._start["epoch"] + 1 and sampler.position == 0:
            return sampler.state_dict()  # the sampler finished the epoch itself
        return {
            **self._start,
            "epoch": self._start["epoch"] + 1,
            "position": 0,
            "generator_state": sampler._state_after_epoch(self._start["generator_state"]),
        }

    def state_dict(self) -> dict[str, Any]:
        """Sampler state at the consumed position, plus the global logical step."""
        return {"sampler": self._sampler_state(), "step": self._step,
                "truncated_batches": self.truncated_batches}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next iteration yields the batches an uninterrupted run would have."""
        self.batch_sampler.load_state_dict(state["sampler"])
        self._step = int(state["step"])
        self.truncated_batches = int(state.get("truncated_batches", 0))
        self._start = None
        self._consumed = 0
        self.current = None


def _is_default_sampling(loader: DataLoader) -> bool:
    """True when the loader samples the DataLoader's own way (shuffle=True/False, batch_size)."""
    sampler = loader.sampler
    default_sampler = type(sampler) is SequentialSampler or (
        type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None
    )
    batch_sampler = loader.batch_sampler
    default_batches = batch_sampler is None or (
        type(batch_sampler) is BatchSampler and batch_sampler.sampler is sampler
    )
    return default_sampler and default_batches


def make_private_data_loader(
    data_loader: DataLoader,
    *,
    sampling: str = "poisson",
    sample_rate: float | None = None,
    batch_size: int | None = None,
    shuffle_once: bool = False,
    drop_last: bool = True,
    max_physical_batch_size: int | None = None,
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
    steps_per_epoch: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    lockstep: bool = False,
    partitions: int | None = None,
    max_batch_size: int | None = None,
) -> DPDataLoader:
    """Rebuild ``data_loader`` around a DP batch sampler.

    Keeps the dataset, collate_fn, num_workers, pin_memory, timeout, worker_init_fn,
    multiprocessing_context, worker seeding generator, prefetch_factor, persistent_workers and
    pin_memory_device; replaces the sampling.

    Args:
        data_loader: the user's DataLoader over a map-style dataset.
        sampling: "poisson", "cyclic", "shuffle" or "cyclic_poisson".
        sample_rate: Poisson (and cyclic Poisson) q; default ``batch_size / len(dataset)``.
        batch_size: logical (cyclic/shuffle) or expected (Poisson) batch size; default the
            loader's ``batch_size``.
        shuffle_once: cyclic only: one seeded permutation before training.
        drop_last: cyclic/shuffle: drop the last partial batch.
        max_physical_batch_size: split logical batches into physical ones of at most this size.
        generator: CPU generator seeding the sampler (copied).
        secure_mode: draw batches from a cryptographically secure generator (ChaCha20).
        steps_per_epoch: Poisson steps per nominal epoch; default round(1/q).
        rank, world_size: data parallel: this process keeps ``batch[rank::world_size]`` of every
            logical batch; every rank must use the same sampler seed.
        lockstep: every rank yields the same number of physical batches per logical batch
            (FSDP2), possibly empty ones.
        partitions: cyclic Poisson sampling: b, the number of partitions (required there).
        max_batch_size: Poisson sampling: truncate each draw to at most K examples.

    Returns:
        The DPDataLoader.

    Raises:
        ValueError: an IterableDataset, an unknown sampling, or missing/inconsistent sizes.
    """
    dataset = _check_user_loader(data_loader)
    check_choice("sampling", sampling, SAMPLINGS)
    batch_size = _logical_batch_size(data_loader, batch_size, sampling)
    common = dict(num_samples=len(dataset), generator=generator, secure_mode=secure_mode)
    check_partitions_given(partitions, sampling=sampling)
    check_max_batch_size(max_batch_size, sampling=sampling)
    if sampling == "poisson":
        batch_sampler = _poisson_sampler(common, sample_rate, batch_size, steps_per_epoch,
                                         max_batch_size)
    elif sampling == "cyclic_poisson":
        batch_sampler = CyclicPoissonBatchSampler(
            sample_rate=_poisson_rate(common, sample_rate, batch_size, sampling),
            partitions=partitions, steps_per_epoch=steps_per_epoch, **common)
    else:
        batch_sampler = _fixed_size_sampler(common, sampling, sample_rate, batch_size,
                                            shuffle_once, drop_last, steps_per_epoch)
    return DPDataLoader(
        dataset,
        batch_sampler=batch_sampler,
        max_physical_batch_size=max_physical_batch_size,
        collate_fn=_collate_fn_of(data_loader),
        rank=rank,
        world_size=world_size,
        lockstep=lockstep,
        **_worker_options_of(data_loader),
    )


def _check_user_loader(data_loader: DataLoader) -> Dataset:
    """The loader's map-style dataset; refuses what cannot be sampled per example (and accelerate's
    prepared loaders, which carry a per-process batch size and their own sharding)."""
    check_data_loader(data_loader)
    return data_loader.dataset


def _logical_batch_size(data_loader: DataLoader, batch_size: int | None, sampling: str):
    """``batch_size`` or the loader's; warns when the loader's own sampler is replaced."""
    if batch_size is None:
        batch_size = data_loader.batch_size
    if _is_default_sampling(data_loader):
        return batch_size
    own = data_loader.sampler
    if type(own) in (SequentialSampler, RandomSampler):
        own = data_loader.batch_sampler
    warnings.warn(
        f"make_private_data_loader: the loader's own sampler ({type(own).__name__}) is replaced "
        f"by {sampling!r} sampling; the privacy accounting assumes the sampling it performs.",
        stacklevel=3,
    )
    if data_loader.batch_sampler is not None and batch_size is None:
        batch_size = getattr(data_loader.batch_sampler, "batch_size", None)
    return batch_size


def _poisson_rate(common, sample_rate, batch_size, sampling) -> float:
    if sample_rate is None:
        if batch_size is None:
            raise ValueError(
                f"sampling={sampling!r} needs sample_rate or batch_size (the loader has "
                "batch_size=None)."
            )
        sample_rate = poisson_rate_of_batch_size(batch_size, common["num_samples"])
    return sample_rate


def _poisson_sampler(common, sample_rate, batch_size, steps_per_epoch,
                     max_batch_size) -> PoissonBatchSampler:
    return PoissonBatchSampler(sample_rate=_poisson_rate(common, sample_rate, batch_size, "poisson"),
                               steps_per_epoch=steps_per_epoch, max_batch_size=max_batch_size,
                               **common)


def _fixed_size_sampler(common, sampling, sample_rate, batch_size, shuffle_once, drop_last,
                        steps_per_epoch) -> _DPBatchSampler:
    if sample_rate is not None or steps_per_epoch is not None:
        raise ValueError(
            f"sample_rate and steps_per_epoch apply to sampling='poisson' only; got "
            f"sampling={sampling!r}."
        )
    if batch_size is None:
        raise ValueError(f"sampling={sampling!r} needs batch_size (the loader has batch_size=None).")
    if sampling == "cyclic":
        return CyclicBatchSampler(batch_size=batch_size, shuffle_once=shuffle_once,
                                  drop_last=drop_last, **common)
    if shuffle_once:
        raise ValueError("shuffle_once applies to sampling='cyclic' only.")
    return ShuffleBatchSampler(batch_size=batch_size, drop_last=drop_last, **common)


def _collate_fn_of(data_loader: DataLoader):
    if data_loader.collate_fn is default_convert:  # the loader had batch_size=None (no auto-collation)
        return default_collate
    return data_loader.collate_fn


def _worker_options_of(data_loader: DataLoader) -> dict[str, Any]:
    """The user's DataLoader options that do not concern sampling, passed on unchanged."""
    options: dict[str, Any] = {
        "num_workers": data_loader.num_workers,
        "pin_memory": data_loader.pin_memory,
        "timeout": data_loader.timeout,
        "worker_init_fn": data_loader.worker_init_fn,
        "multiprocessing_context": data_loader.multiprocessing_context,
        "generator": data_loader.generator,
        "persistent_workers": data_loader.persistent_workers,
        "pin_memory_device": data_loader.pin_memory_device,
        # Batches must come back in sampler order, matched with their LogicalBatch (in_order=False
        # is only a throughput option, so it is not kept).
        "in_order": True,
    }
    if data_loader.num_workers > 0:
        options["prefetch_factor"] = data_loader.prefetch_factor
    return options
