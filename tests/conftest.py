"""Shared test setup: the Triton interpreter on machines without CUDA, float64 oracles."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before anything imports triton: kernels then run on the CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.long``: repetition and power studies that take minutes (a 40-run spawn loop,
    hundreds of audits). CI runs their short versions; DPFUSED_LONG_TESTS=1 runs these too."""
    if os.environ.get("DPFUSED_LONG_TESTS") == "1":
        return
    import pytest

    skip = pytest.mark.skip(reason="a long study: set DPFUSED_LONG_TESTS=1 to run it")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)
