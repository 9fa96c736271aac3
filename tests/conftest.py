"""Shared test setup: the Triton interpreter on machines without CUDA, float64 oracles."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before anything imports triton: kernels then run on the CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
