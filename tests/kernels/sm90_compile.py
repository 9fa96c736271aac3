"""Compile every Triton kernel of dpfused.kernels for an H100 (sm_90) on a machine without a GPU.

Run by test_kernels_sm90_compile.py in a subprocess, or by hand:

    env -u TRITON_INTERPRET python tests/kernels/sm90_compile.py --table

The interpreter (TRITON_INTERPRET=1, what the other kernel tests use) accepts programs the real
compiler rejects: tl.dot on blocks smaller than 16, mismatched dot operand dtypes, tiles whose
pipeline buffers do not fit in shared memory. This script runs the real compiler instead, ahead of
time, down to cubin (Triton ships ptxas), and reports per compiled kernel: shared memory, registers,
spilled bytes and whether the PTX uses tensor cores.

How each kernel is compiled:
1. Every public op is called on small CPU tensors with `resolve_impl` patched to "triton" and each
   module's autotuned kernels replaced by recorders, so the launch arguments (pointer dtypes,
   strides, constexpr flags) are exactly what the launchers pass on a GPU. The ops are called once
   per launcher-reachable flag combination (padding or not, bias or not, RMS or LayerNorm, ...).
2. Each recorded launch is specialized as Triton's JIT does at launch time (16-divisible ints and
   pointers, ints equal to 1 folded to constants), once per autotune config the kernel declares
   (after the autotuner's own pruning, if any), and compiled with
   `triton.compile(..., target=GPUTarget("cuda", 90, 32))`.
3. The same ptxas that Triton runs for sm_90 is run again with -v on the PTX for registers and
   spills.

Must run with TRITON_INTERPRET unset: the kernel modules pick their configs and Triton builds
compiled (not interpreted) kernels when they are imported.

Prints JSON: one row per compiled (kernel, launch flags, dtype, size set, config) with shared
memory, registers, spills, tensor-core instruction or an error; plus the inventory of @triton.jit
kernels, each autotuner's declared configs and the recorded launches, for the coverage checks.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

TARGET_ARCH = 90
WARP_SIZE = 32
MAX_SHARED_PER_BLOCK = 227 * 1024  # sm_90 opt-in limit per block (228 KiB per SM)

# Sizes of the recorded launches. "aligned": every size and stride a multiple of 16 (the usual
# transformer widths; Triton then knows loads are 16-byte aligned and vectorizes them). "odd":
# nothing divisible by 16 (ragged T, vocabularies like GPT-2's 50257), which compiles differently.
SIZE_SETS = {
    "aligned": dict(B=2, T=64, m=96, n=64, V=128, D=64),
    "odd": dict(B=3, T=37, m=50, n=33, V=101, D=45),
}
# Norm-layer tiles come from the launcher, not from the configs: BLOCK_N = next_pow2(N) and BLOCK_R
# rows up to ~_TILE_ELEMENTS. (rows R, width N) pairs reaching distinct tiles: the first gets every
# flag combination, the others LayerNorm with weight and bias.
NORM_SHAPES = {
    "aligned": [(8, 768), (1, 16384), (1, 768)],  # tiles 4×1024, 1×16384, 1×1024 (2-D input)
    "odd": [(81, 50)],  # tile 64×64, unaligned rows
}


# ---------------------------------------------------------------------------------------------
# Recording the launches
# ---------------------------------------------------------------------------------------------
class Launch:
    """One kernel launch as a launcher issued it: the autotuner and its arguments."""

    def __init__(self, tuned, args, kwargs):
        self.tuned, self.args, self.kwargs = tuned, args, kwargs

    @property
    def fn(self):
        """The @triton.jit function (a JITFunction) behind the autotuner."""
        return self.tuned.fn

    @property
    def kernel(self) -> str:
        return kernel_name(self.tuned)

    def configs(self):
        """The autotune configs this launch would try, after the autotuner's own pruning."""
        self.tuned.nargs = dict(zip(self.tuned.arg_names, self.args))
        try:
            return list(self.tuned.prune_configs(self.kwargs))
        finally:
            self.tuned.nargs = None


class _Recorder:
    """Stands in for an autotuned kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, tuned, log):
        self.tuned, self.log = tuned, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(Launch(self.tuned, args, kwargs))
        return launch


def kernel_modules():
    """The modules holding Triton kernels (embedding_norm.py has none: it is torch everywhere)."""
    from dpfused.kernels import chacha20, clipped_grad, direct_norm, ghost_norm, norm_layers
    return [ghost_norm, direct_norm, clipped_grad, norm_layers, chacha20]


def kernel_name(tuned) -> str:
    return tuned.fn.fn.__name__


def autotuned_kernels(module) -> dict:
    """name -> Autotuner for every autotuned kernel a module defines."""
    from triton.runtime.autotuner import Autotuner
    return {name: obj for name, obj in vars(module).items() if isinstance(obj, Autotuner)}


def jit_kernels(module) -> set:
    """Names of the @triton.jit kernels a module defines (the inventory to cover).

    A @triton.jit helper that another @triton.jit function of the module calls (chacha20's
    quarter round) is compiled into its caller, not launched: it is not in the inventory.
    """
    from triton.runtime.jit import JITFunction
    jits = {obj.fn.__name__: obj for obj in vars(module).values()
            if isinstance(obj, JITFunction) and obj.fn.__module__ == module.__name__}
    called = {name for obj in jits.values() for name in obj.fn.__code__.co_names}
    return set(jits) - called


def op_calls(dtype, size_set):
    """(label, thunk) for each public op and each flag combination its launcher can reach.

    The first call of each kernel is the one with the most code (bias, padding, affine LayerNorm):
    it gets every config in `plan_jobs`.
    """
    import torch

    import dpfused.kernels as K

    torch.manual_seed(0)
    B, T, m, n, V, D = (SIZE_SETS[size_set][k] for k in ("B", "T", "m", "n", "V", "D"))

    def rand(*shape):
        return torch.randn(*shape).to(dtype)

    left, right = rand(B, T, m), rand(B, T, n)
    left2, right2 = rand(B, T + 3, m), rand(B, T + 3, n)  # a second use of the weight
    scale = torch.rand(B)
    key_nonce = torch.arange(11, dtype=torch.int64)  # ChaCha20 takes no float input: any dtype
    calls = [
        ("chacha20_blocks", lambda: K.chacha20_blocks(key_nonce, counter=2**32 - 1,
                                                      num_blocks=B * T * D, impl="triton")),
        ("ghost_norm_sq", lambda: K.ghost_norm_sq(left, right, impl="triton")),
        ("ghost_inner", lambda: K.ghost_inner(left, right, left2, right2, impl="triton")),
        ("direct_norm_sq", lambda: K.direct_norm_sq(left, right, impl="triton")),
        ("clipped_weight_grad", lambda: K.clipped_weight_grad(left, right, scale, impl="triton")),
    ]
    # LayerNorm / RMSNorm, each with weight and bias, weight only, no affine (bias needs weight).
    flag_sets = [(rms, affine, has_bias) for rms in (False, True)
                 for affine, has_bias in ((True, True), (True, False), (False, False))]
    for i, (rows, width) in enumerate(NORM_SHAPES[size_set]):
        x, g = rand(B, rows, width), rand(B, rows, width)
        for rms, affine, has_bias in flag_sets if i == 0 else flag_sets[:1]:
            w = rand(width) if affine else None
            label = (f"norm_layer_backward(R={rows}, N={width}, rms={rms}, weight={affine}, "
                     f"has_bias={has_bias})")
            calls.append((label, lambda x=x, g=g, w=w, width=width, rms=rms, has_bias=has_bias:
                          K.norm_layer_backward(x, g, w, normalized_shape=(width,), eps=1e-5,
                                                rms=rms, has_bias=has_bias, impl="triton")))
    return calls


def record_launches(dtype_name, size_set):
    """[(op label, Launch)] for every call of `op_calls`, without running any kernel."""
    import torch

    log, saved = [], []
    for module in kernel_modules():
        saved.append((module, "resolve_impl", module.resolve_impl))
        module.resolve_impl = lambda impl, *tensors: "triton"
        for name, tuned in autotuned_kernels(module).items():
            saved.append((module, name, tuned))
            setattr(module, name, _Recorder(tuned, log))
    try:
        out = []
        for label, call in op_calls(getattr(torch, dtype_name), size_set):
            start = len(log)
            call()
            if len(log) != start + 1:
                raise RuntimeError(f"{label} launched {len(log) - start} kernels; expected one")
            out.append((label, log[-1]))
        return out
    finally:
        for module, name, obj in saved:
            setattr(module, name, obj)


# ---------------------------------------------------------------------------------------------
# Compiling one launch with one config
# ---------------------------------------------------------------------------------------------
def compile_launch(launch, config):
    """triton.compile the launch for sm_90 as the JIT would on an H100; returns the kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", TARGET_ARCH, WARP_SIZE)
    backend = make_backend(target)
    fn = launch.fn
    kwargs = {**launch.kwargs, **config.all_kwargs()}
    # What JITFunction.run does, minus the driver: bind, specialize, pack.
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args,
                                                          specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_TENSOR_CORE = re.compile(r"^\s*(?:@%p\d+\s+)?(wgmma\.mma_async|mma\.sync)\b", re.MULTILINE)


def ptxas_usage(ptx: str) -> dict:
    """Registers and spills from `ptxas -v`, with the ptxas and flags Triton uses for sm_90.

    That ptxas is Triton's `ptxas-blackwell` (CUDA 13.x) for every arch >= 90: the older bundled
    `ptxas` rejects the PTX ISA version Triton emits.
    """
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(TARGET_ARCH).path
    arch = sm_arch_from_capability(TARGET_ARCH)  # sm_90a
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src,
               "-o", os.path.join(tmp, "kernel.cubin")]
        result = subprocess.run(cmd, capture_output=True, text=True)
    log = result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"ptxas -v failed ({result.returncode}):\n{log}")
    used, spill = _PTXAS_USED.search(log), _PTXAS_SPILL.search(log)
    if used is None or spill is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return dict(registers=int(used.group(1)), stack_bytes=int(spill.group(1)),
                spill_stores=int(spill.group(2)), spill_loads=int(spill.group(3)))


# ---------------------------------------------------------------------------------------------
# Which (launch, config) pairs to compile
# ---------------------------------------------------------------------------------------------
# (dtype, size set, depth). "all": every config of the first launch of each kernel (of each
# norm-layer tile: the launcher picks the tile, and which warp counts survive the pruning depends on
# it), one config of every other launch, rotating through the configs. "dots": "all" for the tl.dot
# kernels (those given DOT_PRECISION), one config per launch for the others. "one": the first
# config of the first launch of each kernel. fp32 gets "dots": its dot tiles take twice the shared
# memory of bf16 ones, and exact fp32 dots run on CUDA cores with the accumulator in registers.
PLAN = [
    ("bfloat16", "aligned", "all"),
    ("float32", "aligned", "dots"),
    ("float16", "aligned", "one"),
    ("bfloat16", "odd", "one"),
]


def config_dict(config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def plan_jobs():
    """[(dtype, size set, op label, config index)] and {(dtype, size set): {label: Launch}}."""
    jobs, launches = [], {}
    for dtype, size_set, depth in PLAN:
        recorded = record_launches(dtype, size_set)
        launches[(dtype, size_set)] = dict(recorded)
        seen = {}  # group -> launches of it so far
        for label, launch in recorded:
            tile = {k: v for k, v in launch.kwargs.items() if k.startswith("BLOCK_")}
            group = (launch.kernel,) + ((repr(tile),) if depth != "one" else ())
            k = seen[group] = seen.get(group, -1) + 1
            n_configs = len(launch.configs())
            sweep = depth == "all" or (depth == "dots" and "DOT_PRECISION" in launch.kwargs)
            if depth == "one":
                indices = [0] if k == 0 else []
            else:
                indices = range(n_configs) if sweep and k == 0 else [k % n_configs]
            jobs += [(dtype, size_set, label, i) for i in indices]
    return jobs, launches


def run_job(job, launches) -> dict:
    """Compile one (launch, config) and measure it; a failure is reported in the row."""
    dtype, size_set, label, index = job
    launch = launches[(dtype, size_set)][label]
    config = launch.configs()[index]
    row = dict(kernel=launch.kernel, op=label, dtype=dtype, sizes=size_set,
               flags=launch.kwargs, config=config_dict(config))
    start = time.perf_counter()
    try:
        kernel = compile_launch(launch, config)
        ptx = kernel.asm["ptx"]
        mma = _TENSOR_CORE.search(ptx)
        row.update(shared=kernel.metadata.shared, uses_dot="tt.dot" in kernel.asm["ttir"],
                   tensor_cores=mma.group(1) if mma else None, **ptxas_usage(ptx))
    except Exception as e:  # noqa: BLE001 - one failure must not hide the others
        row["error"] = f"{type(e).__name__}: {e}"[:4000]
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", type=int, default=0, help="compile jobs[shard::num_shards]")
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="print a table instead of JSON")
    opts = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing")

    jobs, launches = plan_jobs()
    rows = [run_job(job, launches) for job in jobs[opts.shard::opts.num_shards]]
    if opts.table:
        print_table(rows)
        return
    modules = kernel_modules()
    json.dump(dict(
        jobs=len(jobs),
        rows=rows,
        inventory=sorted(name for module in modules for name in jit_kernels(module)),
        declared={kernel_name(tuned): [config_dict(c) for c in tuned.configs]
                  for module in modules for tuned in autotuned_kernels(module).values()},
        launches=[dict(kernel=launch.kernel, op=label, dtype=dtype, sizes=size_set)
                  for (dtype, size_set), by_label in launches.items()
                  for label, launch in by_label.items()],
    ), sys.stdout)


def print_table(rows):
    print(f"{'kernel':24} {'dtype':8} {'sizes':7} {'config':58} {'flags':44} "
          f"{'smem':>6} {'regs':>4} {'spill':>5} {'mma':>6}")
    for r in rows:
        cfg = ",".join(f"{k}={v}" for k, v in r["config"].items())
        flags = ",".join(f"{k}={v}" for k, v in r["flags"].items() if k != "UPCAST")
        head = f"{r['kernel']:24} {r['dtype']:8} {r['sizes']:7} {cfg:58} {flags:44}"
        if "error" in r:
            print(f"{head} ERROR {r['error'][:300]}")
        else:
            print(f"{head} {r['shared']:6d} {r['registers']:4d} {r['spill_stores']:5d} "
                  f"{r['tensor_cores'] or '-':>6}")


if __name__ == "__main__":
    main()
