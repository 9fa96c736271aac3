"""choose_norm_path, resolve_impl, and importing dpfused.kernels without triton."""

import os
import subprocess
import sys

import pytest
import torch

from dpfused.kernels import choose_norm_path, resolve_impl, triton_available


@pytest.mark.parametrize("seq_len, rows, cols, path", [
    (1, 1, 1, "ghost"),  # T = 1: ‖a‖²‖g‖², always ghost
    (1, 4096, 1024, "ghost"),
    (512, 4096, 1024, "ghost"),  # 512·5120 < 4096·1024
    (2048, 768, 768, "direct"),  # 2048·1536 > 768²
    (2, 4, 4, "direct"),  # tie (2·8 = 16): direct
    (3, 1, 100, "direct"),
])
def test_choose_norm_path_by_flops(seq_len, rows, cols, path):
    assert choose_norm_path(seq_len=seq_len, rows=rows, cols=cols) == path


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None])
def test_choose_norm_path_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="seq_len"):
        choose_norm_path(seq_len=bad, rows=2, cols=2)


def test_resolve_impl(monkeypatch):
    cpu = torch.zeros(2)
    assert triton_available()
    assert resolve_impl("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("fast", cpu)
    with pytest.raises(ValueError, match="float64"):
        resolve_impl("triton", cpu.double())
    if not torch.cuda.is_available():
        assert resolve_impl("auto", cpu) == "torch"  # CPU tensors: torch even when interpreting
        assert resolve_impl("triton", cpu) == "triton"  # conftest set TRITON_INTERPRET=1
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            resolve_impl("triton", cpu)


_NO_TRITON = """
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError
import torch
import dpfused.kernels as k
assert not k.triton_available()
left, right = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
assert torch.allclose(k.ghost_norm_sq(left, right), k.direct_norm_sq(left, right), rtol=1e-4)
try:
    k.ghost_norm_sq(left, right, impl="triton")
except ValueError as err:
    assert "triton" in str(err)
    print("refused")
"""


def test_import_and_auto_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _NO_TRITON], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "refused" in proc.stdout
