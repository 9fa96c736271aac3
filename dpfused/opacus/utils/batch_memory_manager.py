"""Opacus' ``BatchMemoryManager`` (``opacus.utils.batch_memory_manager``): bound the memory of a
step without changing the privacy.

    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=32,
                            optimizer=optimizer) as loader:
        for x, y in loader:          # the loop is unchanged
            ...

Inside the block the DP loader yields physical batches of at most ``max_physical_batch_size``
examples; ``optimizer.step()`` skips all but the last physical batch of each logical batch, so the
clipped sums accumulate and the noise is added once per logical batch (docs/design.md §5). The sampling,
the accounting and the result are those of ``make_private(max_physical_batch_size=...)``, dpfused's
own way to say it.
As in Opacus, ``len()`` of the loader the block yields is the expected number of physical batches
per epoch (``len(data_loader)`` outside the block stays the number of logical batches, the steps).
"""

from __future__ import annotations

import math

from dpfused.arguments import check_instance, check_integer
from dpfused.optimizer import DPOptimizer
from dpfused.sampling import DPDataLoader

__all__ = ["BatchMemoryManager"]


class BatchMemoryManager:
    """Split logical batches into physical ones inside a ``with`` block.

    Args:
        data_loader: the DP data loader ``make_private`` returned.
        max_physical_batch_size: at most this many examples per forward/backward.
        optimizer: the DPOptimizer ``make_private`` returned with that loader.

    Raises:
        TypeError / ValueError: a loader or optimizer that did not come from one make_private
            call, or a size that is not a positive int.
    """

    def __init__(self, *, data_loader: DPDataLoader, max_physical_batch_size: int,
                 optimizer: DPOptimizer):
        check_instance("BatchMemoryManager: data_loader", data_loader, DPDataLoader,
                       "the DPDataLoader make_private returned")
        check_instance("BatchMemoryManager: optimizer", optimizer, DPOptimizer,
                       "the DPOptimizer make_private returned")
        if optimizer.instrumentation.book.begin not in data_loader.listeners:
            raise ValueError(
                "BatchMemoryManager: the optimizer was made private with another data loader; it "
                "could not tell where a logical batch ends. Pass the pair make_private returned"
            )
        self.data_loader = data_loader
        self.max_physical_batch_size = check_integer("BatchMemoryManager: max_physical_batch_size",
                                                     max_physical_batch_size)
        self.optimizer = optimizer
        self._saved: int | None = None

    def __enter__(self) -> "PhysicalBatches":
        self._saved = self.data_loader.max_physical_batch_size
        self.data_loader.max_physical_batch_size = self.max_physical_batch_size
        return PhysicalBatches(self.data_loader)

    def __exit__(self, *exc_info) -> bool:
        self.data_loader.max_physical_batch_size = self._saved
        return False


class PhysicalBatches:
    """The DP data loader as a ``BatchMemoryManager`` block sees it: the same iteration and
    attributes, and ``len()`` the expected physical batches per epoch (Opacus' count:
    ceil(logical batches * expected logical size / max_physical_batch_size))."""

    def __init__(self, data_loader: DPDataLoader):
        self.data_loader = data_loader

    def __iter__(self):
        return iter(self.data_loader)

    def __len__(self) -> int:
        loader = self.data_loader
        return math.ceil(len(loader) * loader.expected_batch_size / loader.max_physical_batch_size)

    def __getattr__(self, name):
        return getattr(self.data_loader, name)
