"""Batch samplers that sample the way the privacy analysis assumes (docs/design.md §6).

``poisson`` (every example joins each batch independently with probability q; batch sizes vary,
batches may be empty; optionally truncated to ``max_batch_size`` by a uniformly random subset),
``cyclic_poisson`` (b-min-sep: the data split once into b fixed partitions, step t draws Poisson
from partition t mod b at rate q b, so an example joins at most one step in any b consecutive
steps: what BandMF's accounting needs), ``cyclic`` (one fixed order, the same every epoch) and
``shuffle`` (a fresh permutation every epoch). ``batches_per_epoch`` is the one rule for how many
logical batches an epoch has; calibration asks it too.

Resumption. Each sampler keeps ``epoch``, ``position`` (batches handed out in the current epoch)
and the state its generator had when the epoch began. An epoch's batches are a deterministic
function of that state, so an iterator always restarts from it and regenerates (and skips) the
``position`` batches already handed out. A state saved mid-epoch thus resumes with exactly the
batches an uninterrupted run would have produced.

Randomness. Every sampler owns a CPU ``torch.Generator``. By default it is seeded from torch's global
RNG (so ``torch.manual_seed`` makes runs repeatable); a ``generator`` argument is copied, not
shared. ``secure_mode=True`` draws from a cryptographically secure generator instead
(``dpfused.secure_random.ChaCha20Generator``, keyed from the operating system): nobody can predict
the batches from earlier ones. Checkpoints contain the generator state (in secure mode, its key):
keep them as secret as the data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import Sampler

from dpfused.arguments import check_generator, check_integer, check_sample_rate
from dpfused.secure_random import ChaCha20Generator
from dpfused.step import SAMPLINGS, partition_sample_rate

__all__ = [
    "SAMPLINGS",
    "CyclicBatchSampler",
    "CyclicPoissonBatchSampler",
    "PoissonBatchSampler",
    "ShuffleBatchSampler",
    "batches_per_epoch",
    "inclusion_threshold",
    "partition_sample_rate",
    "poisson_rate_of_batch_size",
]


def batches_per_epoch(*, sampling: str, num_samples: int | None = None,
                      sample_rate: float | None = None, batch_size: int | None = None,
                      drop_last: bool = True, steps_per_epoch: int | None = None,
                      partitions: int | None = None) -> int:
    """Logical batches in one epoch: round(1/q) Poisson steps (or ``steps_per_epoch``);
    b * max(1, round(1 / (q b))) cyclic Poisson steps with b partitions (whole cycles: every
    partition gets its turn, and an epoch still covers about 1/q steps); N // b cyclic/shuffle
    batches (ceil(N / b) when the last partial batch is kept)."""
    if sampling == "poisson":
        return steps_per_epoch if steps_per_epoch is not None else max(1, round(1.0 / sample_rate))
    if sampling == "cyclic_poisson":
        if steps_per_epoch is not None:
            return steps_per_epoch
        return partitions * max(1, round(1.0 / partition_sample_rate(sample_rate, partitions)))
    return num_samples // batch_size if drop_last else math.ceil(num_samples / batch_size)


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------


def _own_generator(generator: torch.Generator | None, secure_mode: bool):
    """A generator owned by the sampler (see the module docstring)."""
    if secure_mode:
        if isinstance(generator, ChaCha20Generator):
            return generator  # the engine's, shared by data-parallel ranks; never copied
        if generator is not None:
            raise ValueError(
                "secure_mode=True draws batches from a cryptographically secure generator keyed "
                "from the operating system; do not pass generator as well."
            )
        return ChaCha20Generator()
    own = torch.Generator(device="cpu")
    if generator is None:
        own.manual_seed(int(torch.randint(0, 2**62, (), dtype=torch.int64).item()))
    elif isinstance(generator, ChaCha20Generator):
        raise TypeError("generator: pass secure_mode=True instead of a ChaCha20Generator (a copy "
                        "of it would replay its stream).")
    else:
        check_generator("generator", generator, cpu=True)
        own.set_state(generator.get_state())
    return own


_UNIFORM_BITS = 53  # float64 uniforms are k / 2^53, k uniform on 0 .. 2^53 - 1 (both generators)


def inclusion_threshold(sample_rate: float) -> float:
    """The threshold t with P(U < t) = t <= q exactly, for U = k / 2^53 (docs/design.md §6).

    Both generators draw float64 uniforms k / 2^53 (torch's CPU ``rand`` keeps 53 bits of a 64-bit
    draw; ChaCha20's ``rand`` the top 53 bits of a keystream word), so P(U < t) = ceil(t 2^53) / 2^53.
    With t = floor(q 2^53) / 2^53 (exact in float64: scaling by a power of two and floor are exact)
    the real rate is t, never above the q the accountant composes, and below it by less than
    2^-53. A rate below q is safe: Poisson sampling at t is sampling at q followed by sampling at
    t/q, which only amplifies. (Float32 uniforms, k / 2^24, gave ceil(q 2^24) / 2^24 instead:
    3.7 times q at q = 1.6e-8.)
    """
    return math.floor(sample_rate * 2.0**_UNIFORM_BITS) / 2.0**_UNIFORM_BITS


def _poisson_mask(generator, n: int, sample_rate: float) -> torch.Tensor:
    """n independent coins, each True with probability ``inclusion_threshold(sample_rate)``."""
    if isinstance(generator, ChaCha20Generator):
        uniforms = generator.rand(n, dtype=torch.float64)
    else:
        uniforms = torch.rand(n, dtype=torch.float64, generator=generator)
    return uniforms < inclusion_threshold(sample_rate)


def _permutation(generator, n: int) -> torch.Tensor:
    if isinstance(generator, ChaCha20Generator):
        return generator.randperm(n)
    return torch.randperm(n, generator=generator)


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
        self.num_samples = check_integer("num_samples", num_samples)
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
        secure = isinstance(self.generator, ChaCha20Generator)
        scratch = ChaCha20Generator() if secure else torch.Generator(device="cpu")
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

    Truncated Poisson (``max_batch_size=K``): a draw of more than K indices is cut to a uniformly
    random subset of K of them, drawn from the sampler's own generator (a permutation of the
    draw), so a logical batch never holds more than K examples. The accountant composes
    dp_accounting's ``TruncatedSubsampledGaussianDpEvent`` for such steps (docs/design.md §6, §7.2).
    ``last_truncated`` says whether the batch just yielded was cut; it depends on the sampler's
    coins only, like the batch size, and is no more private than it.

    Args:
        num_samples: dataset size N.
        sample_rate: q in (0, 1].
        steps_per_epoch: steps per nominal epoch; default round(1/q).
        max_batch_size: K >= 1, truncate every draw to at most K examples (None: no truncation).
        generator: CPU generator whose state seeds the sampler's own (copied).
        secure_mode: draw from a cryptographically secure generator (see the module docstring).
    """

    sampling = "poisson"

    def __init__(
        self,
        *,
        num_samples: int,
        sample_rate: float,
        steps_per_epoch: int | None = None,
        max_batch_size: int | None = None,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
    ) -> None:
        self.sample_rate = check_sample_rate(sample_rate)
        if steps_per_epoch is not None:
            check_integer("steps_per_epoch", steps_per_epoch)
        self.max_batch_size = (None if max_batch_size is None
                               else check_integer("max_batch_size", max_batch_size))
        self.batches_per_epoch = batches_per_epoch(
            sampling="poisson", sample_rate=self.sample_rate, steps_per_epoch=steps_per_epoch)
        self.last_truncated = False
        super().__init__(num_samples=num_samples, generator=generator, secure_mode=secure_mode)

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch

    def _epoch_batches(self, generator: torch.Generator) -> Iterator[list[int]]:
        for _ in range(self.batches_per_epoch):
            drawn = _poisson_mask(generator, self.num_samples, self.sample_rate).nonzero().flatten()
            yield self._truncated(generator, drawn).tolist()

    def _truncated(self, generator, drawn: torch.Tensor) -> torch.Tensor:
        """``drawn`` cut to a uniformly random subset of K (kept in increasing order)."""
        self.last_truncated = self.max_batch_size is not None and len(drawn) > self.max_batch_size
        if not self.last_truncated:
            return drawn
        keep = _permutation(generator, len(drawn))[: self.max_batch_size]
        return drawn[keep.sort().values]

    def _config(self) -> dict[str, Any]:
        config = {
            **super()._config(),
            "sample_rate": self.sample_rate,
            "steps_per_epoch": self.batches_per_epoch,
        }
        if self.max_batch_size is not None:  # a state saved without truncation stays loadable
            config["max_batch_size"] = self.max_batch_size
        return config


class CyclicPoissonBatchSampler(_DPBatchSampler):
    """b-min-sep Poisson sampling (cyclic Poisson; Choquette-Choo et al. 2023, "(Amplified) Banded
    Matrix Factorization"): an example joins at most one step in any b consecutive steps.

    Before training every index is put in one of b partitions, independently and uniformly at
    random from the seeded generator (so removing or adding an example leaves the others'
    partitions distributed as before: add/remove holds, as for plain Poisson sampling; cutting one
    permutation into b equal slices would tie every example's partition to the others'). Step t
    (counted from the sampler's first step; epochs are whole cycles of b steps) draws every index
    of partition t mod b independently with probability q b (``partition_sample_rate``), so the
    expected batch is q N, as with plain Poisson sampling at q. Each example can join only the
    steps of its partition, b apart. The accountant
    composes one ``PoissonSampledDpEvent(q b, GaussianDpEvent(sigma / max column norm))`` per cycle
    of b steps (docs/design.md §7.2).

    Args:
        num_samples: dataset size N.
        sample_rate: q in (0, 1]; q b must be at most 1.
        partitions: b >= 1, at most N (BandMF's bands).
        steps_per_epoch: steps per nominal epoch, a multiple of b; default
            b * max(1, round(1 / (q b))).
        generator: CPU generator whose state seeds the sampler's own (copied).
        secure_mode: draw from a cryptographically secure generator.

    Raises:
        ValueError: q b > 1, b > N or a steps_per_epoch that is not a multiple of b: such a
            sampler cannot keep an example's steps b apart at the expected batch size.
    """

    sampling = "cyclic_poisson"

    def __init__(
        self,
        *,
        num_samples: int,
        sample_rate: float,
        partitions: int,
        steps_per_epoch: int | None = None,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
    ) -> None:
        self.sample_rate = check_sample_rate(sample_rate)
        self.partitions = check_integer("partitions", partitions)
        check_partitions(num_samples=check_integer("num_samples", num_samples),
                         sample_rate=self.sample_rate, partitions=self.partitions,
                         steps_per_epoch=steps_per_epoch)
        self.partition_rate = partition_sample_rate(self.sample_rate, self.partitions)
        self.batches_per_epoch = batches_per_epoch(
            sampling="cyclic_poisson", sample_rate=self.sample_rate, partitions=self.partitions,
            steps_per_epoch=steps_per_epoch)
        super().__init__(num_samples=num_samples, generator=generator, secure_mode=secure_mode)
        self.assignment = _partition_ids(self.generator, self.num_samples, self.partitions)
        self._epoch_start_state = self.generator.get_state()

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch

    def partition(self, k: int) -> torch.Tensor:
        """The indices of partition k (0 <= k < b), in increasing order."""
        return (self.assignment == k).nonzero().flatten()

    def _epoch_batches(self, generator: torch.Generator) -> Iterator[list[int]]:
        parts = [self.partition(k) for k in range(self.partitions)]
        for position in range(self.batches_per_epoch):
            part = parts[position % self.partitions]  # epochs are whole cycles: t mod b
            mask = _poisson_mask(generator, len(part), self.partition_rate)
            yield part[mask].tolist()

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "sample_rate": self.sample_rate,
            "partitions": self.partitions,
            "steps_per_epoch": self.batches_per_epoch,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "assignment": self.assignment.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        assignment = state["assignment"]
        if (not isinstance(assignment, torch.Tensor) or assignment.shape != (self.num_samples,)
                or bool(((assignment < 0) | (assignment >= self.partitions)).any())):
            raise ValueError("load_state_dict: the saved partitions do not fit num_samples and "
                             "partitions.")
        super().load_state_dict(state)
        self.assignment = assignment.clone()


def _partition_ids(generator, n: int, partitions: int) -> torch.Tensor:
    """An independent, uniform partition in 0..b-1 for each of n indices: floor(U b), U a float64
    uniform k / 2^53 (exact: b < 2^53; floor(U b) < b)."""
    if isinstance(generator, ChaCha20Generator):
        uniforms = generator.rand(n, dtype=torch.float64)
    else:
        uniforms = torch.rand(n, dtype=torch.float64, generator=generator)
    return (uniforms * partitions).floor().to(torch.int64)


def check_partitions(*, num_samples: int, sample_rate: float, partitions: int,
                     steps_per_epoch: int | None = None) -> None:
    """What a cyclic Poisson sampler with b partitions needs: q b <= 1, b <= N, whole cycles.

    Raises:
        ValueError: naming the values and the fix.
    """
    if partitions > num_samples:
        raise ValueError(
            f"cyclic_poisson sampling with {partitions} partitions (BandMF bands) needs at least "
            f"as many examples; the dataset has {num_samples}. Use fewer bands")
    rate = partition_sample_rate(sample_rate, partitions)
    if rate > 1:
        raise ValueError(
            f"cyclic_poisson sampling draws each step from one of {partitions} partitions at rate "
            f"q * b = {sample_rate:.6g} * {partitions} = {rate:.6g} > 1, so it cannot keep an "
            "example's steps b apart at this expected batch size; use fewer bands (at most "
            f"{math.floor(1 / sample_rate)}) or a smaller batch size")
    if steps_per_epoch is not None and (
            check_integer("steps_per_epoch", steps_per_epoch) % partitions):
        raise ValueError(
            f"steps_per_epoch={steps_per_epoch} is not a multiple of the {partitions} partitions: "
            "cyclic_poisson epochs are whole cycles (step t draws from partition t mod b)")


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
        self.batch_size = check_integer("batch_size", batch_size)
        self.drop_last = bool(drop_last)
        if self.drop_last and self.batch_size > self.num_samples:
            raise ValueError(
                f"batch_size={batch_size} exceeds num_samples={num_samples} with drop_last=True: "
                "an epoch would have no batch."
            )
        self.batches_per_epoch = batches_per_epoch(
            sampling=self.sampling, num_samples=self.num_samples, batch_size=self.batch_size,
            drop_last=self.drop_last)

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
        secure_mode: draw from a cryptographically secure generator.
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
            self.order = _permutation(self.generator, self.num_samples)
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
        secure_mode: draw from a cryptographically secure generator.
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
        return self._batches_of(_permutation(generator, self.num_samples))


def poisson_rate_of_batch_size(batch_size: int, num_samples: int) -> float:
    """The Poisson rate q = batch_size / len(dataset) that a loader's batch size stands for.

    Raises:
        ValueError: the batch size exceeds the dataset (q > 1), naming both and the fix.
    """
    if batch_size > num_samples:
        raise ValueError(
            f"the data loader's batch_size ({batch_size}) is larger than its dataset "
            f"({num_samples} examples): Poisson sampling draws each example with probability "
            "batch_size / len(dataset), which must be at most 1. Use a batch_size of at most "
            f"{num_samples} (batch_size={num_samples} trains on the whole dataset every step, "
            "sample rate 1)")
    return batch_size / num_samples
