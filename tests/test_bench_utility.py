"""benchmarks/bench_utility.py: the seconds-long smoke run writes the table, the JSON and the plot."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_utility.py"


def test_utility_benchmark_smoke_writes_table_json_and_plot(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "utility"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.with_suffix(".md").read_text()
    for row in ("non-private", "DP-SGD", "BandMF b=4", "BandMF b=16", "truncated Poisson",
                "automatic clipping"):
        assert row in table and row in proc.stdout
    assert "Machine: " in table and "Command: " in table
    assert "digits" in table or "Fashion-MNIST" in table
    runs = json.loads(out.with_suffix(".json").read_text())["results"][0]["rows"]
    assert len(runs) == 6 and all(len(r["runs"]) == 1 for r in runs)
    assert out.with_suffix(".png").stat().st_size > 1000
