"""Batch samplers that sample the way the privacy analysis assumes, and a data loader over them.

DESIGN §6: ``poisson`` (every example joins each batch independently with probability q; batch
sizes vary, batches may be empty), ``cyclic`` (one fixed order, the same every epoch) and ``shuffle``
(a fresh permutation every epoch).

Resumption. Each sampler keeps ``epoch``, ``position`` (batches handed out in the current epoch)
and the state its generator had when the epoch began. An epoch's batches are a deterministic
function of that state, so an iterator always restarts from it and regenerates (and skips) the
``position`` batches already handed out. A state saved mid-epoch thus resumes with exactly the
batches an uninterrupted run would have produced.

Randomness. Every sampler owns a CPU ``torch.Generator``. By default it is seeded from torch's global
RNG (so ``torch.manual_seed`` makes runs repeatable); a ``generator`` argument is copied, not
shared. ``secure_mode=True`` seeds it with 64 bits from the operating system's entropy source
(``secrets``). That makes the seed unguessable, nothing more: the stream is still torch's Mersenne
Twister, which is *not* a cryptographically secure generator (unlike Opacus' secure mode, which draws
from torchcsprng), so someone who sees enough of its output could reconstruct its state. Checkpoints
contain the generator state: keep them as secret as the data.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)
from torch.utils.data._utils.collate import default_collate, default_convert

__all__ = [
    "CyclicBatchSampler",
    "DPDataLoader",
    "PhysicalBatchInfo",
    "PoissonBatchSampler",
    "ShuffleBatchSampler",
    "make_private_data_loader",
]

SAMPLINGS = ("poisson", "cyclic", "shuffle")


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------


def _own_generator(generator: torch.Generator | None, secure_mode: bool) -> torch.Generator:
    """A CPU generator owned by the sampler (see the module docstring)."""
    if secure_mode and generator is not None:
        raise ValueError(
            "secure_mode=True seeds the sampler's generator from the OS entropy source; "
            "do not pass generator as well."
        )
    own = torch.Generator(device="cpu")
    if secure_mode:
        own.manual_seed(secrets.randbits(64))
    elif generator is None:
        own.manual_seed(int(torch.randint(0, 2**62, (), dtype=torch.int64).item()))
    else:
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise TypeError(f"generator must be a CPU torch.Generator; got {generator!r}.")
        own.set_state(generator.get_state())
    return own


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")
    return int(value)


# ---------------------------------------------------------------------------------------------
# Batch samplers
# ---------------------------------------------------------------------------------------------


class _DPBatchSampler(Sampler[list[int]]):
    """Shared epoch/position bookkeeping and resumable iteration.

    Subclasses define ``sampling``, ``batches_per_epoch`` and ``_epoch_batches(generator)``, which
    yields one epoch of batches drawing from ``generator`` as it goes.
    """

    sampling: str = ""
    batches_per_epoch: int

    def __init__(
        self, *, num_samples: int, generator: torch.Generator | None, secure_mode: bool
    ) -> None:
        self.num_samples = _check_positive_int("num_samples", num_samples)
        self.secure_mode = bool(secure_mode)
        self.generator = _own_generator(generator, secure_mode)
        self.epoch = 0
        self.position = 0
        self._epoch_start_state = self.generator.get_state()

    def _epoch_batches(self, generator: torch.Generator) -> Iterator[list[int]]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch, from ``position`` on; the epoch ends with the iterator."""
        self.generator.set_state(self._epoch_start_state)
        batches = self._epoch_batches(self.generator)
        for _ in range(self.position):  # regenerate what was handed out already
            next(batches)
        for index in range(self.position, self.batches_per_epoch):
            batch = next(batches)
            self.position = index + 1
            yield batch
        for _ in batches:  # an epoch's draws must all be taken for the next epoch's state
            pass
        self._epoch_start_state = self.generator.get_state()
        self.epoch += 1
        self.position = 0

    def _state_after_epoch(self, epoch_start_state: torch.Tensor) -> torch.Tensor:
        """Generator state at the start of the next epoch, without touching this sampler."""
        scratch = torch.Generator(device="cpu")
        scratch.set_state(epoch_start_state)
        for _ in self._epoch_batches(scratch):
            pass
        return scratch.get_state()

    # -- checkpointing ---------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {"sampling": self.sampling, "num_samples": self.num_samples}

    def state_dict(self) -> dict[str, Any]:
        """Epoch, position in it, the generator state at the epoch's start, and the config."""
        return {
            **self._config(),
            "epoch": self.epoch,
            "position": self.position,
            "generator_state": self._epoch_start_state.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at the saved position: the next iterator continues where the saved run was.

        Raises:
            ValueError: the state belongs to a sampler with another configuration.
        """
        for key, value in self._config().items():
            saved = state.get(key)
            if isinstance(value, torch.Tensor):
                same = isinstance(saved, torch.Tensor) and torch.equal(saved, value)
            else:
                same = saved == value
            if not same:
                raise ValueError(
                    f"load_state_dict: saved {key}={saved!r} does not match this "
                    f"{type(self).__name__}'s {key}={value!r}; build the sampler with the saved "
                    "configuration."
                )
        position = int(state["position"])
        if not 0 <= position <= self.batches_per_epoch:
            raise ValueError(f"load_state_dict: position {position} is outside the epoch.")
        self.epoch = int(state["epoch"])
        self.position = position
        self._epoch_start_state = state["generator_state"].clone()
        self.generator.set_state(self._epoch_start_state)


class PoissonBatchSampler(_DPBatchSampler):
    """Poisson sampling: at each step every index joins independently with probability q.

    Batches are lists of indices, possibly empty (an empty batch must still be a noised step).

    Args:
        num_samples: dataset size N.
        sample_rate: q in (0, 1].
        steps_per_epoch: steps per nominal epoch; default round(1/q).
        generator: CPU generator whose state seeds the sampler's own (copied).
        secure_mode: seed from the OS entropy source instead (see the module docstring).
    """

    sampling = "poisson"

    def __init__(
        self,
        *,
        num_samples: int,
        sample_rate: float,
        steps_per_epoch: int | None = None,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
    ) -> None:
        if isinstance(sample_rate, bool) or not (
            isinstance(sample_rate, (int, float, np.floating)) and 0.0 < sample_rate <= 1.0
        ):
            raise ValueError(f"sample_rate must be in (0, 1]; got {sample_rate!r}.")
        self.sample_rate = float(sample_rate)
        if steps_per_epoch is None:
            steps_per_epoch = max(1, round(1.0 / self.sample_rate))
        self.batches_per_epoch = _check_positive_int("steps_per_epoch", steps_per_epoch)
        super().__init__(num_samples=num_samples, generator=generator, secure_mode=secure_mode)

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch

    def _epoch_batches(self, generator: torch.Generator) -> Iterator[list[int]]:
        for _ in range(self.batches_per_epoch):
            mask = torch.rand(self.num_samples, generator=generator) < self.sample_rate
            yield mask.nonzero().flatten().tolist()

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "sample_rate": self.sample_rate,
            "steps_per_epoch": self.batches_per_epoch,
        }


class _FixedSizeBatchSampler(_DPBatchSampler):
    """Consecutive batches of ``batch_size`` over an order of all indices."""

    def __init__(
        self,
        *,
        num_samples: int,
        batch_size: int,
        drop_last: bool,
        generator: torch.Generator | None,
        secure_mode: bool,
    ) -> None:
        super().__init__(num_samples=num_samples, generator=generator, secure_mode=secure_mode)
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.drop_last = bool(drop_last)
        if self.drop_last and self.batch_size > self.num_samples:
            raise ValueError(
                f"batch_size={batch_size} exceeds num_samples={num_samples} with drop_last=True: "
                "an epoch would have no batch."
            )
        self.batches_per_epoch = (
            self.num_samples // self.batch_size
            if self.drop_last
            else math.ceil(self.num_samples / self.batch_size)
        )

    def _batches_of(self, order: torch.Tensor) -> Iterator[list[int]]:
        b = self.batch_size
        for i in range(self.batches_per_epoch):
            yield order[i * b : (i + 1) * b].tolist()

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "batch_size": self.batch_size, "drop_last": self.drop_last}


class CyclicBatchSampler(_FixedSizeBatchSampler):
    """Cyclic sampling: one fixed order, consecutive batches, the same order every epoch.

    Args:
        num_samples: dataset size N.
        batch_size: b.
        shuffle_once: draw one permutation from the generator now and keep it (else the identity).
        drop_last: drop the last partial batch (default) or keep it.
        generator: CPU generator whose state seeds the sampler's own (copied).
        secure_mode: seed from the OS entropy source instead.
    """

    sampling = "cyclic"

    def __init__(
        self,
        *,
        num_samples: int,
        batch_size: int,
        shuffle_once: bool = False,
        drop_last: bool = True,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
    ) -> None:
        super().__init__(
            num_samples=num_samples,
            batch_size=batch_size,
            drop_last=drop_last,
            generator=generator,
            secure_mode=secure_mode,
        )
        self.shuffle_once = bool(shuffle_once)
        if self.shuffle_once:
            self.order = torch.randperm(self.num_samples, generator=self.generator)
        else:
            self.order = torch.arange(self.num_samples)
        self._epoch_start_state = self.generator.get_state()

    def _epoch_batches(self, generator: torch.Generator) -> Iterator[list[int]]:
        return self._batches_of(self.order)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "order": self.order.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        order = state["order"]
        if not isinstance(order, torch.Tensor) or order.shape != (self.num_samples,):
            raise ValueError("load_state_dict: the saved order does not fit num_samples.")
        super().load_state_dict(state)
        self.order = order.clone()


class ShuffleBatchSampler(_FixedSizeBatchSampler):
    """Shuffled sampling: a fresh permutation every epoch, consecutive batches of ``batch_size``.

    Args:
        num_samples: dataset size N.
        batch_size: b.
        drop_last: drop the last partial batch (default) or keep it.
        generator: CPU generator whose state seeds the sampler's own (copied).
        secure_mode: seed from the OS entropy source instead.
    """

    sampling = "shuffle"

    def __init__(
        self,
        *,
        num_samples: int,
        batch_size: int,
        drop_last: bool = True,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
    ) -> None:
        super().__init__(
            num_samples=num_samples,
            batch_size=batch_size,
            drop_last=drop_last,
            generator=generator,
            secure_mode=secure_mode,
        )

    def _epoch_batches(self, generator: torch.Generator) -> Iterator[list[int]]:
        return self._batches_of(torch.randperm(self.num_samples, generator=generator))


# ---------------------------------------------------------------------------------------------
# Collation of empty batches
# ---------------------------------------------------------------------------------------------


def _empty_like_batch(batch: Any) -> Any:
    """The collated ``batch`` with zero examples: tensors/arrays sliced to [:0], same structure."""
    if isinstance(batch, torch.Tensor):
        return batch[:0] if batch.dim() > 0 else batch.new_empty((0,))
    if isinstance(batch, np.ndarray):
        return batch[:0]
    if isinstance(batch, Mapping):
        items = {key: _empty_like_batch(value) for key, value in batch.items()}
        try:
            return type(batch)(items)
        except TypeError:
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple: one field each
        return type(batch)(*(_empty_like_batch(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        structured = (torch.Tensor, np.ndarray, Mapping, list, tuple)
        if batch and all(isinstance(v, structured) for v in batch):  # fields, e.g. (inputs, labels)
            return type(batch)(_empty_like_batch(v) for v in batch)
        # Per-example leaves (strings, ids) that the collate_fn kept as a sequence of length B.
        return type(batch)()
    return batch


class _EmptySafeCollate:
    """Wraps a collate_fn so that an empty (Poisson) batch collates to zero-size tensors.

    The structure, dtypes and trailing shapes are those of collating ``[dataset[0]]``; computed once
    per process (workers included) and cached.
    """

    def __init__(self, collate_fn: Callable[[list], Any], dataset: Dataset) -> None:
        self.collate_fn = collate_fn
        self.dataset = dataset
        self._empty: Any = None
        self._have_empty = False

    def __call__(self, batch: list) -> Any:
        if len(batch) > 0:
            return self.collate_fn(batch)
        if not self._have_empty:
            self._empty = _empty_like_batch(self.collate_fn([self.dataset[0]]))
            self._have_empty = True
        return _empty_like_batch(self._empty)  # a fresh container each time

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_empty": None, "_have_empty": False}


# ---------------------------------------------------------------------------------------------
# Physical batches
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhysicalBatchInfo:
    """Where a physical batch sits in its logical batch (``DPDataLoader.current``).

    Attributes:
        step: logical step index since the start (global, survives epochs and resumption).
        epoch: epoch index.
        position_in_epoch: logical batch index within the epoch (0-based).
        batches_per_epoch: logical batches per epoch.
        logical_size: examples in this logical batch.
        physical_size: examples in this physical batch.
        is_last_physical: True on the physical batch that completes its logical batch.
        local_size: examples of this logical batch on this rank (= logical_size on one process).
    """

    step: int
    epoch: int
    position_in_epoch: int
    batches_per_epoch: int
    logical_size: int
    physical_size: int
    is_last_physical: bool
    local_size: int = -1

    def __post_init__(self) -> None:
        if self.local_size < 0:
            object.__setattr__(self, "local_size", self.logical_size)


class _PhysicalBatchSampler(Sampler[list[int]]):
    """Splits each logical batch into physical chunks and queues each chunk's info.

    Runs in the main process (DataLoader draws indices there, also with workers), ahead of
    consumption by up to the prefetch depth; batches come back in order, so the loader pops the
    infos FIFO. Each ``iter`` gets a fresh queue so an abandoned iteration leaves nothing stale.
    """

    def __init__(self, logical: _DPBatchSampler, max_physical_batch_size: int | None,
                 rank: int = 0, world_size: int = 1) -> None:
        self.logical = logical
        self.max_physical_batch_size = max_physical_batch_size
        self.rank, self.world_size = rank, world_size
        self.first_step = 0
        self.infos: deque[PhysicalBatchInfo] = deque()

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
            share = batch[self.rank :: self.world_size]
            if not share or k is None:
                chunks = [share]  # an empty share is one empty physical batch
            else:
                chunks = [share[i : i + k] for i in range(0, len(share), k)]
            for j, chunk in enumerate(chunks):
                infos.append(
                    PhysicalBatchInfo(
                        step=step,
                        epoch=self.logical.epoch,
                        position_in_epoch=position,
                        batches_per_epoch=self.logical.batches_per_epoch,
                        logical_size=len(batch),
                        physical_size=len(chunk),
                        is_last_physical=j == len(chunks) - 1,
                        local_size=len(share),
                    )
                )
                yield chunk
            step += 1


# ---------------------------------------------------------------------------------------------
# Data loader
# ---------------------------------------------------------------------------------------------


class DPDataLoader:
    """A DataLoader over a DP batch sampler, yielding physical batches.

    Iterating yields one epoch (the rest of the current one after a resume). Just before each
    batch is yielded, ``current`` is set to its :class:`PhysicalBatchInfo`. A logical batch counts
    as consumed when its last physical batch is yielded; ``state_dict`` records the consumed
    position, so save checkpoints between logical steps.

    ``len()`` is the number of logical batches per epoch (with ``max_physical_batch_size`` the
    number of physical batches varies).

    Args:
        dataset: a map-style dataset.
        batch_sampler: a :class:`PoissonBatchSampler`, :class:`CyclicBatchSampler` or
            :class:`ShuffleBatchSampler` over ``len(dataset)`` examples.
        max_physical_batch_size: split logical batches into physical ones of at most this size.
        collate_fn: as for DataLoader (default ``default_collate``); empty batches are handled.
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
        **data_loader_kwargs: Any,
    ) -> None:
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "DPDataLoader needs a map-style dataset (with __getitem__ and __len__): an "
                "IterableDataset cannot be sampled per example, so Poisson/cyclic/shuffled batches "
                "and their privacy accounting are impossible. Wrap the data in a map-style Dataset."
            )
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
        self.collate_fn = _EmptySafeCollate(collate_fn or default_collate, dataset)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size}).")
        self.rank, self.world_size = rank, world_size
        self._physical = _PhysicalBatchSampler(batch_sampler, None, rank, world_size)
        self.max_physical_batch_size = max_physical_batch_size
        self.data_loader = DataLoader(
            dataset,
            batch_sampler=self._physical,
            collate_fn=self.collate_fn,
            **data_loader_kwargs,
        )
        self.current: PhysicalBatchInfo | None = None
        self._step = 0  # logical steps consumed
        self._start: dict[str, Any] | None = None  # sampler state when the running epoch began
        self._consumed = 0  # logical batches of that epoch consumed

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
    def num_samples(self) -> int:
        return self.batch_sampler.num_samples

    @property
    def max_physical_batch_size(self) -> int | None:
        """Physical batches hold at most this many examples (None: whole logical batches)."""
        return self._physical.max_physical_batch_size

    @max_physical_batch_size.setter
    def max_physical_batch_size(self, value: int | None) -> None:
        # Takes effect at the next iteration (BatchMemoryManager sets it before the loop).
        if value is not None:
            value = _check_positive_int("max_physical_batch_size", value)
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
            self.current = info
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
        return {"sampler": self._sampler_state(), "step": self._step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next iteration yields the batches an uninterrupted run would have."""
        self.batch_sampler.load_state_dict(state["sampler"])
        self._step = int(state["step"])
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
) -> DPDataLoader:
    """Rebuild ``data_loader`` around a DP batch sampler.

    Keeps the dataset, collate_fn, num_workers, pin_memory, timeout, worker_init_fn,
    multiprocessing_context, worker seeding generator, prefetch_factor, persistent_workers and
    pin_memory_device; replaces the sampling.

    Args:
        data_loader: the user's DataLoader over a map-style dataset.
        sampling: "poisson", "cyclic" or "shuffle".
        sample_rate: Poisson q; default ``batch_size / len(dataset)``.
        batch_size: logical (cyclic/shuffle) or expected (Poisson) batch size; default the
            loader's ``batch_size``.
        shuffle_once: cyclic only: one seeded permutation before training.
        drop_last: cyclic/shuffle: drop the last partial batch.
        max_physical_batch_size: split logical batches into physical ones of at most this size.
        generator: CPU generator seeding the sampler (copied).
        secure_mode: seed the sampler from the OS entropy source (not a CSPRNG stream).
        steps_per_epoch: Poisson steps per nominal epoch; default round(1/q).
        rank, world_size: data parallel: this process keeps ``batch[rank::world_size]`` of every
            logical batch; every rank must use the same sampler seed.

    Returns:
        The DPDataLoader.

    Raises:
        ValueError: an IterableDataset, an unknown sampling, or missing/inconsistent sizes.
    """
    # accelerate's prepared loaders pass isinstance(DataLoader) (they fake __class__) but carry a
    # per-process batch size and their own sharding: refuse them rather than guess.
    if type(data_loader).__module__.split(".")[0] == "accelerate":
        raise TypeError(
            f"data_loader is accelerate's {type(data_loader).__name__}: pass the DataLoader from "
            "before accelerator.prepare(). dpfused draws each logical batch itself and gives every "
            "rank its slice, which the privacy accounting relies on."
        )
    if not isinstance(data_loader, DataLoader):
        raise TypeError(f"data_loader must be a torch DataLoader; got {type(data_loader).__name__}.")
    dataset = data_loader.dataset
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            "make_private_data_loader needs a map-style dataset (with __getitem__ and __len__): "
            f"the loader's dataset is an IterableDataset ({type(dataset).__name__}), which cannot "
            "be sampled per example, so DP sampling and its accounting are impossible. Wrap the "
            "data in a map-style Dataset."
        )
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}; got {sampling!r}.")
    num_samples = len(dataset)
    if batch_size is None:
        batch_size = data_loader.batch_size
    if not _is_default_sampling(data_loader):
        own = data_loader.sampler
        if type(own) in (SequentialSampler, RandomSampler):
            own = data_loader.batch_sampler
        used = type(own).__name__
        warnings.warn(
            f"make_private_data_loader: the loader's own sampler ({used}) is replaced by "
            f"{sampling!r} sampling; the privacy accounting assumes the sampling it performs.",
            stacklevel=2,
        )
        if data_loader.batch_sampler is not None and batch_size is None:
            batch_size = getattr(data_loader.batch_sampler, "batch_size", None)

    if sampling == "poisson":
        if sample_rate is None:
            if batch_size is None:
                raise ValueError(
                    "sampling='poisson' needs sample_rate or batch_size (the loader has "
                    "batch_size=None)."
                )
            sample_rate = batch_size / num_samples
        batch_sampler: _DPBatchSampler = PoissonBatchSampler(
            num_samples=num_samples,
            sample_rate=sample_rate,
            steps_per_epoch=steps_per_epoch,
            generator=generator,
            secure_mode=secure_mode,
        )
    else:
        if sample_rate is not None or steps_per_epoch is not None:
            raise ValueError(
                f"sample_rate and steps_per_epoch apply to sampling='poisson' only; got "
                f"sampling={sampling!r}."
            )
        if batch_size is None:
            raise ValueError(
                f"sampling={sampling!r} needs batch_size (the loader has batch_size=None)."
            )
        if sampling == "cyclic":
            batch_sampler = CyclicBatchSampler(
                num_samples=num_samples,
                batch_size=batch_size,
                shuffle_once=shuffle_once,
                drop_last=drop_last,
                generator=generator,
                secure_mode=secure_mode,
            )
        else:
            if shuffle_once:
                raise ValueError("shuffle_once applies to sampling='cyclic' only.")
            batch_sampler = ShuffleBatchSampler(
                num_samples=num_samples,
                batch_size=batch_size,
                drop_last=drop_last,
                generator=generator,
                secure_mode=secure_mode,
            )

    collate_fn = data_loader.collate_fn
    if collate_fn is default_convert:  # the loader had batch_size=None (no auto-collation)
        collate_fn = default_collate
    kwargs: dict[str, Any] = {
        "num_workers": data_loader.num_workers,
        "pin_memory": data_loader.pin_memory,
        "timeout": data_loader.timeout,
        "worker_init_fn": data_loader.worker_init_fn,
        "multiprocessing_context": data_loader.multiprocessing_context,
        "generator": data_loader.generator,
        "persistent_workers": data_loader.persistent_workers,
        "pin_memory_device": data_loader.pin_memory_device,
        # Batches must come back in sampler order for DPDataLoader.current (in_order=False is
        # only a throughput option, so it is not kept).
        "in_order": True,
    }
    if data_loader.num_workers > 0:
        kwargs["prefetch_factor"] = data_loader.prefetch_factor
    return DPDataLoader(
        dataset,
        batch_sampler=batch_sampler,
        max_physical_batch_size=max_physical_batch_size,
        collate_fn=collate_fn,
        rank=rank,
        world_size=world_size,
        **kwargs,
    )
