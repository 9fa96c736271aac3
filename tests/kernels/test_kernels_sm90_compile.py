"""Every Triton kernel compiles for an H100 (sm_90), down to cubin, on a machine without a GPU.

The interpreter that runs the other kernel tests accepts programs the real compiler rejects (tl.dot
on blocks smaller than 16, dot operands of two dtypes, pipelines that overflow shared memory) and
says nothing of registers. sm90_compile.py (next to this file; it lists what is compiled) records
each launcher's real launches on CPU tensors and compiles them for sm_90 with each autotune config
the kernel declares, in bf16 (every config), fp32 (every config of the tl.dot kernels), fp16, and
at sizes not divisible by 16. Checked per compiled kernel:

- it compiles, through Triton's own ptxas, to a cubin;
- shared memory fits sm_90's 227 KiB per block;
- ptxas spills no registers (or no more than the documented bounds below);
- bf16/fp16 tl.dot kernels run on tensor cores (wgmma or mma.sync in the PTX), and fp32 ones do not
  (they ask for exact "ieee" dots: TF32 would cost ~1e-3 relative error in the norms).

The compiling runs in subprocesses without TRITON_INTERPRET (the kernel modules decide at import
between interpreted and compiled kernels), one per core, with a fresh Triton cache.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

import sm90_compile  # noqa: E402  (tests/kernels is on sys.path, as for kernel_oracles)

HELPER = Path(__file__).with_name("sm90_compile.py")
MAIN_DTYPE = "bfloat16"
MAX_SHARED_BYTES = sm90_compile.MAX_SHARED_PER_BLOCK

# Bytes of spill stores per thread (ptxas -v) allowed where a config spills today; every other
# (kernel, dtype) must spill nothing.
SPILL_BOUNDS = {
    # BLOCK_T=32 with 4 warps spills 4-8 bytes at only 72 registers: an artifact of the
    # --regAllocOptLevel=2 that Triton passes to ptxas 13.x as a bug workaround (none without it).
    ("_ghost_kernel", "bfloat16"): 16,
    ("_ghost_kernel", "float16"): 16,
    # The widest tile (1 × 16384) at the register caps of 16 and 32 warps (128 and 64 registers):
    # 20-50 bytes; a 64×64 tile of odd width (no vectorized loads) at 4 warps: 8 bytes. Tiles
    # that would spill kilobytes are pruned by norm_layers._prune_configs.
    ("_norm_backward_kernel", "bfloat16"): 64,
    ("_norm_backward_kernel", "float32"): 64,
}


def _ptxas_or_skip():
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(sm90_compile.TARGET_ARCH).path
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"this triton package has no NVIDIA backend or no bundled ptxas ({e}); the "
                    "PyPI wheel for Linux x86-64 ships both")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Merged JSON report of all shards of sm90_compile.py."""
    _ptxas_or_skip()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    shards = max(1, min(4, os.cpu_count() or 1))
    procs = [subprocess.Popen([sys.executable, str(HELPER), "--shard", str(i),
                               "--num-shards", str(shards)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(shards)]
    parts = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"sm90_compile.py failed:\n{err[-4000:]}"
            parts.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    merged = dict(parts[0], rows=[row for part in parts for row in part["rows"]])
    assert len(merged["rows"]) == merged["jobs"]
    return merged


def _name(row) -> str:
    config = ",".join(f"{k}={v}" for k, v in row["config"].items())
    flags = ",".join(f"{k}={v}" for k, v in row["flags"].items())
    return f"{row['kernel']} {row['dtype']} ({row['sizes']} sizes) [{config}] [{flags}]"


def _compiled(report):
    return [row for row in report["rows"] if "error" not in row]


def test_every_kernel_compiles_to_cubin_for_sm90(report):
    failures = [f"{_name(row)}:\n{row['error']}" for row in report["rows"] if "error" in row]
    assert not failures, "\n\n".join(failures)


def test_covers_every_kernel_config_and_flag_combination(report):
    rows = report["rows"]
    assert {row["kernel"] for row in rows} == set(report["inventory"])
    # Every declared autotune config compiled at least once in the main dtype.
    for kernel, declared in report["declared"].items():
        compiled = {json.dumps(row["config"], sort_keys=True) for row in rows
                    if row["kernel"] == kernel and row["dtype"] == MAIN_DTYPE}
        missing = [c for c in declared if json.dumps(c, sort_keys=True) not in compiled]
        assert not missing, f"{kernel}: configs never compiled in {MAIN_DTYPE}: {missing}"
    # Every recorded launch (op and flag combination) compiled, where the plan says so.
    done = {(row["dtype"], row["sizes"], row["op"]) for row in rows}
    full = {(dtype, sizes) for dtype, sizes, depth in sm90_compile.PLAN if depth != "one"}
    missing = [launch for launch in report["launches"]
               if (launch["dtype"], launch["sizes"]) in full
               and (launch["dtype"], launch["sizes"], launch["op"]) not in done]
    assert not missing, f"launches never compiled: {missing}"
    for dtype, sizes, _ in sm90_compile.PLAN:
        kernels = {row["kernel"] for row in rows if (row["dtype"], row["sizes"]) == (dtype, sizes)}
        assert kernels == set(report["inventory"]), (dtype, sizes, kernels)


def test_shared_memory_fits_sm90(report):
    over = [f"{_name(row)}: {row['shared']} bytes" for row in _compiled(report)
            if row["shared"] > MAX_SHARED_BYTES]
    assert not over, f"over the {MAX_SHARED_BYTES}-byte shared memory limit:\n" + "\n".join(over)


def test_register_spills_within_bounds(report):
    over = []
    for row in _compiled(report):
        bound = SPILL_BOUNDS.get((row["kernel"], row["dtype"]), 0)
        if row["spill_stores"] > bound:
            over.append(f"{_name(row)}: {row['spill_stores']} bytes spilled "
                        f"({row['registers']} registers), bound {bound}")
    assert not over, "register spills:\n" + "\n".join(over)


def test_dot_kernels_use_tensor_cores_in_half_precision_only(report):
    dots = [row for row in _compiled(report) if row["uses_dot"]]
    assert {row["kernel"] for row in dots} >= {"_ghost_kernel", "_direct_kernel",
                                               "_clipped_grad_kernel"}
    wrong = [_name(row) + f": {row['tensor_cores']}" for row in dots
             if bool(row["tensor_cores"]) != (row["dtype"] in ("bfloat16", "float16"))]
    assert not wrong, ("bf16/fp16 dots must use tensor cores, exact fp32 (ieee) dots must not:\n"
                       + "\n".join(wrong))
