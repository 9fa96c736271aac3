"""Batch samplers that sample the way the privacy analysis assumes (docs/design.md §6).

``poisson`` (every example joins each batch independently with probability q; batch sizes vary,
batches may be empty), ``cyclic`` (one fixed order, the same every epoch) and ``shuffle`` (a fresh
permutation every epoch). ``batches_per_epoch`` is the one rule for how many logical batches an
epoch has; calibration asks it too.

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

import numpy as np
import torch
from torch.utils.data import Sampler

from dpfused.secure_random import ChaCha20Generator
from dpfused.step import SAMPLINGS

__all__ = [
    "SAMPLINGS",
    "CyclicBatchSampler",
    "PoissonBatchSampler",
    "ShuffleBatchSampler",
    "batches_per_epoch",
    "inclusion_threshold",
    "poisson_rate_of_batch_size",
]


def batches_per_epoch(*, sampling: str, num_samples: int | None = None,
                      sample_rate: float | None = None, batch_size: int | None = None,
                      drop_last: bool = True, steps_per_epoch: int | None = None) -> int:
    """Logical batches in one epoch: round(1/q) Poisson steps (or ``steps_per_epoch``);
    N // b cyclic/shuffle batches (ceil(N / b) when the last partial batch is kept)."""
    if sampling == "poisson":
        return steps_per_epoch if steps_per_epoch is not None else max(1, round(1.0 / sample_rate))
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
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise TypeError(f"generator must be a CPU torch.Generator; got {generator!r}.")
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

    Args:
        num_samples: dataset size N.
        sample_rate: q in (0, 1].
        steps_per_epoch: steps per nominal epoch; default round(1/q).
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
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
    ) -> None:
        if isinstance(sample_rate, bool) or not (
            isinstance(sample_rate, (int, float, np.floating)) and 0.0 < sample_rate <= 1.0
        ):
            raise ValueError(f"sample_rate must be in (0, 1]; got {sample_rate!r}.")
        self.sample_rate = float(sample_rate)
        if steps_per_epoch is not None:
            _check_positive_int("steps_per_epoch", steps_per_epoch)
        self.batches_per_epoch = batches_per_epoch(
            sampling="poisson", sample_rate=self.sample_rate, steps_per_epoch=steps_per_epoch)
        super().__init__(num_samples=num_samples, generator=generator, secure_mode=secure_mode)

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch

    def _epoch_batches(self, generator: torch.Generator) -> Iterator[list[int]]:
        for _ in range(self.batches_per_epoch):
            mask = _poisson_mask(generator, self.num_samples, self.sample_rate)
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
