"""Sampling the way the privacy analysis assumes: DP batch samplers and the DP data loader."""

from dpfused.sampling.loader import DPDataLoader, make_private_data_loader
from dpfused.sampling.samplers import (
    SAMPLINGS,
    CyclicBatchSampler,
    CyclicPoissonBatchSampler,
    PoissonBatchSampler,
    ShuffleBatchSampler,
    batches_per_epoch,
)
from dpfused.step import LogicalBatch

__all__ = [
    "SAMPLINGS",
    "CyclicBatchSampler",
    "CyclicPoissonBatchSampler",
    "DPDataLoader",
    "LogicalBatch",
    "PoissonBatchSampler",
    "ShuffleBatchSampler",
    "batches_per_epoch",
    "make_private_data_loader",
]
