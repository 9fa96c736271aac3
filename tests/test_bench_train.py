"""benchmarks/bench_train.py runs its whole pipeline on the CPU (--tiny) and writes table, JSON and PNG."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_train.py"
METHODS = ("nonprivate", "dpfused_per_layer", "dpfused_flat", "dpfused_per_device",
           "opacus_hooks", "opacus_ghost", "nonprivate_fp16", "dpfused_per_layer_fp16")
TINY_MODELS = ("gpt2-tiny", "llama-tiny", "resnet-tiny")  # GPT-2, Llama and vision families


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_train")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    return proc, out


def test_tiny_run_exits_cleanly(tiny_run):
    proc, _ = tiny_run
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"


def test_table_has_every_method_and_model_family(tiny_run):
    proc, _ = tiny_run
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    cells = {(cols[0], cols[2]) for cols in
             ([c.strip() for c in line.strip("|").split("|")] for line in table[1:])}
    for model in TINY_MODELS:
        for method in METHODS:
            assert (model, method) in cells, f"no row for {model} / {method}:\n{proc.stdout}"


def test_json_and_png_are_written(tiny_run):
    _, out = tiny_run
    assert (out / "train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "train.json").read_text())
    rows = report["rows"]
    assert {r["model"] for r in rows} == set(TINY_MODELS)
    assert {r["method"] for r in rows} == set(METHODS)
    assert report["meta"]["tiny"] is True
    # Every cell is also appended as it finishes, so a run cut off by a time limit keeps them.
    partial = [json.loads(line) for line in (out / "train.partial.jsonl").read_text().splitlines()]
    assert partial == rows


def test_ratios_are_against_the_nonprivate_baseline(tiny_run):
    _, out = tiny_run
    rows = json.loads((out / "train.json").read_text())["rows"]
    for r in rows:
        if r["method"] == "nonprivate":
            assert r["status"] == "ok"
            assert r["throughput_ratio"] == 1.0
            assert r["memory_ratio"] in (None, 1.0)  # None: no GPU memory on the CPU
        elif r["status"] == "ok":
            assert r["throughput_ratio"] > 0
            assert r["examples_per_s"] > 0


def test_every_dpfused_method_runs_and_opacus_failures_are_reported(tiny_run):
    _, out = tiny_run
    rows = json.loads((out / "train.json").read_text())["rows"]
    for r in rows:
        if r["method"].startswith("dpfused_"):
            assert r["status"] == "ok", r
            assert r["step_ms"] > 0 and len(r["step_ms_all"]) >= 1
            if r["family"] != "vision":
                assert r["tokens_per_s"] == pytest.approx(r["examples_per_s"] * r["seq_len"])
        if r["method"].startswith("opacus_"):
            assert r["status"] == "ok" or r["status"].startswith("n/a: "), r


# ---- the max-batch search, which only runs on a GPU: its logic against a fake memory limit ----


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("limit, start", [(37, 8), (37, 64), (1, 16), (5000, 16), (100, 100)])
def test_max_batch_search_finds_the_limit(monkeypatch, limit, start):
    bench = _load_script()
    probes = []

    def fake_measure(method, spec, seq_len, batch_size, **kwargs):
        probes.append(batch_size)
        return bench.Measurement("ok" if batch_size <= limit else "OOM")

    monkeypatch.setattr(bench, "measure", fake_measure)
    found = bench.max_batch_size("nonprivate", None, None, start, cap=4096)
    assert found <= min(limit, 4096)
    assert found >= min(limit, 4096) * (1 - 1 / 32) - 1  # ~3% resolution
    assert len(probes) < 30


def test_max_batch_search_gives_up_on_errors(monkeypatch):
    bench = _load_script()
    monkeypatch.setattr(bench, "measure", lambda *a, **k: bench.Measurement("n/a: unsupported"))
    assert bench.max_batch_size("opacus_ghost", None, None, 8, cap=4096) is None
    monkeypatch.setattr(bench, "measure", lambda *a, **k: bench.Measurement("OOM"))
    assert bench.max_batch_size("opacus_hooks", None, None, 8, cap=4096) is None


def test_tiny_fsdp_and_ddp_rows(tmp_path):
    """--fsdp --ddp relaunch the script under torch.distributed.run (2 CPU processes, gloo): each
    mode's rows, ratios against that mode's own non-private row, one table from rank 0."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--fsdp", "--ddp", "--models",
                           "llama-tiny", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.stdout.count("| model |") == 1  # rank 0 alone prints
    report = json.loads((tmp_path / "train.json").read_text())
    assert report["meta"]["processes"] == 2 and report["meta"]["parallel"] == ["fsdp", "ddp"]
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {f"{mode}:{m}" for mode in ("fsdp", "ddp")
                         for m in ("nonprivate", "dpfused_per_layer", "dpfused_flat")}
    for method, row in rows.items():
        assert row["status"] == "ok", (method, row["status"])
        assert row["batch_size"] == 8  # 4 per rank: the logical batch over both ranks
        assert row["examples_per_s"] == pytest.approx(8 / (row["step_ms"] / 1e3))
        mode = method.split(":")[0]
        base = rows[f"{mode}:nonprivate"]["examples_per_s"]
        assert row["throughput_ratio"] == pytest.approx(row["examples_per_s"] / base)
