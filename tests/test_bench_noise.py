"""benchmarks/bench_noise.py: a seconds-long CPU run prints the throughput table."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_noise.py"


def test_noise_benchmark_smoke_prints_table():
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--devices", "cpu", "--sizes", "512",
                           "--min-seconds", "0"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| device | values | method | values/s | ratio vs normal_ |" in proc.stdout
    for method in ("torch normal_", "cryptography keystream", "torch keystream"):
        assert method in proc.stdout
    assert "machine: " in proc.stdout
