"""Kernel tests: without CUDA, every Triton kernel runs on the CPU interpreter.

TRITON_INTERPRET must be set before `dpfused.kernels` is imported: Triton decides at decoration
time whether a kernel is compiled or interpreted, and the kernel modules pick their (single)
interpreter autotune config at import. pytest imports this file before the test modules below it.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    _ghost = sys.modules.get("dpfused.kernels.ghost_norm")
    if _ghost is not None and _ghost._CONFIGS is not _ghost._INTERPRETER_CONFIGS:
        # Re-decorating after the fact does not work (Triton's interpreter then refuses the
        # compiled-mode helpers), so fail loudly instead of running compiled kernels on the CPU.
        raise pytest.UsageError(
            "dpfused.kernels was imported before TRITON_INTERPRET=1 was set; set it in the "
            "environment or in tests/conftest.py before anything imports dpfused")


@pytest.fixture(autouse=True)
def _seeded():
    """Every kernel test draws the same random inputs on every run (and on every machine)."""
    torch.manual_seed(0)
