"""Noise throughput: dpfused's ChaCha20Generator.normal against torch's `Tensor.normal_`.

`secure_mode=True` draws every noise value from the ChaCha20 keystream (dpfused.secure_random):
8 keystream words per value (four Box–Muller draws from 53-bit uniforms, summed, as the
floating-point-attack mitigation of Holohan & Braghin 2021 asks), in float64, rounded to the
output dtype. This measures what that costs against torch's own generator (Mersenne Twister on the
CPU, Philox on CUDA), in values per second, for float32 noise of a few sizes:

- cpu: `time.perf_counter` loops (median of repeats). Rows: the generator with its CPU keystream
  from OpenSSL (through `cryptography`, the default) and from the torch twin of the kernel (the
  fallback without `cryptography`), and `torch.Tensor.normal_`.
- cuda (when a GPU exists; skipped otherwise): `triton.testing.do_bench` medians. Rows: the
  generator with the Triton keystream kernel, and `normal_`.

`ratio` is the row's time over `normal_`'s at the same size (how many times slower).

    python benchmarks/bench_noise.py                   # CPU, and the GPU if there is one
    python benchmarks/bench_noise.py --sizes 65536 1048576 --devices cpu --threads 1
    python benchmarks/bench_noise.py --devices cpu --sizes 512 --min-seconds 0   # smoke test (CI)
"""

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from dpfused.secure_random import ChaCha20Generator

CPU_SIZES = [1 << 16, 1 << 20, 1 << 22]
CUDA_SIZES = [1 << 20, 1 << 24, 1 << 26]
TWIN_MAX_SIZE = 1 << 20  # the torch-twin keystream is slow on the CPU; not timed above this


@dataclass
class Row:
    device: str
    size: int
    method: str
    seconds: float
    baseline: float = float("nan")

    @property
    def values_per_s(self) -> float:
        return self.size / self.seconds

    @property
    def ratio(self) -> float:
        return self.seconds / self.baseline


def time_cpu(fn, *, min_seconds: float = 1.0, max_repeats: int = 50) -> float:
    """Median seconds of `fn()` over repeats adding up to about `min_seconds` (one warm-up)."""
    fn()
    times = []
    while len(times) < max_repeats and (len(times) < 3 or sum(times) < min_seconds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_cuda(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0] / 1e3  # ms -> s


def bench_device(device: str, sizes: list[int], *, min_seconds: float = 1.0) -> list[Row]:
    timer = time_cuda if device == "cuda" else (
        lambda fn: time_cpu(fn, min_seconds=min_seconds))
    impls = ["triton"] if device == "cuda" else ["cryptography", "torch"]
    rows = []
    for size in sizes:
        out = torch.empty(size, device=device)
        baseline = timer(lambda: out.normal_())
        rows.append(Row(device, size, "torch normal_", baseline, baseline))
        for impl in impls:
            if impl == "torch" and size > TWIN_MAX_SIZE:
                continue
            g = ChaCha20Generator(impl=impl)
            seconds = timer(lambda: g.normal(size, std=1.0, device=device))
            rows.append(Row(device, size, f"ChaCha20Generator.normal ({impl} keystream)",
                            seconds, baseline))
    return rows


def machine() -> str:
    import numpy
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"numpy {numpy.__version__}", f"{platform.processor() or platform.machine()}",
             f"torch threads {torch.get_num_threads()}"]
    try:
        import cryptography
        from cryptography.hazmat.backends.openssl.backend import backend
        parts.append(f"cryptography {cryptography.__version__} "
                     f"({backend.openssl_version_text()})")
    except ImportError:
        parts.append("cryptography not installed")
    if torch.cuda.is_available():
        import triton
        parts.append(f"{torch.cuda.get_device_name()} triton {triton.__version__}")
    return ", ".join(parts)


def print_table(rows: list[Row]) -> None:
    print("| device | values | method | values/s | ratio vs normal_ |")
    print("|---|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r.device} | {r.size:,} | {r.method} | {r.values_per_s:.3g} | {r.ratio:.1f}x |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=["cpu", "cuda"])
    p.add_argument("--sizes", nargs="+", type=int, default=None,
                   help=f"noise values per call (default: cpu {CPU_SIZES}, cuda {CUDA_SIZES})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 gives steadier figures on a "
                        "shared machine")
    p.add_argument("--min-seconds", type=float, default=1.0,
                   help="CPU: time each row for about this long (0: three calls, a smoke test)")
    opts = p.parse_args(argv)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    rows = []
    for device in opts.devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("cuda: no GPU here, skipped", file=sys.stderr)
            continue
        sizes = opts.sizes or (CUDA_SIZES if device == "cuda" else CPU_SIZES)
        rows += bench_device(device, sizes, min_seconds=opts.min_seconds)
    print(f"machine: {machine()}\n")
    print_table(rows)


if __name__ == "__main__":
    main()
