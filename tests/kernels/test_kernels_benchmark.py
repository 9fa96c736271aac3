"""benchmarks/bench_kernels.py: the --tiny CPU smoke mode prints a table and writes its files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_kernels.py"


def test_benchmark_tiny_prints_table(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| op | impl | model |" in proc.stdout
    assert "ghost_norm" in proc.stdout and "clipped_grad" in proc.stdout
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert {r["op"] for r in rows} >= {"ghost_norm", "direct_norm", "clipped_grad",
                                        "embedding_norm", "plain_gemm", "linear_backward"}
    layer = [r for r in rows if r["op"] == "linear_backward"]
    assert {r["impl"].split(" ")[0] for r in layer} == {"plain", "dpfused_per_layer"}
    assert all(r["x_nonprivate"] > 0 for r in layer)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on CPU-only machines")
def test_benchmark_refuses_without_cuda(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode != 0
    assert "needs a CUDA GPU" in proc.stderr and "--tiny" in proc.stderr
