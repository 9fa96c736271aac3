"""Collation of empty Poisson batches: zero-example tensors with the structure of a real batch.

An empty logical batch must still be a noised step (docs/design.md §5), so the model may be called
on it; these helpers give it inputs of the right structure, dtypes and trailing shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["EmptySafeCollate"]

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


class EmptySafeCollate:
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

