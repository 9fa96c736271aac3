#!/usr/bin/env bash
# The GPU checks in ONE device call of at most 5 minutes (the budget is 15 minutes per task, a
# machine start included, so one rerun must still fit). Each phase has its own timeout and writes
# under $OUT as it goes; a phase cut off keeps what it wrote.
#
#   bash benchmarks/gpu_wheels.sh                              # here, once: .whl/ (git-ignored)
#   DRY_RUN=1 bash benchmarks/gpu_check.sh                     # here, on the CPU: tiny shapes
#   device run, carry [".whl"], timeout_s 360:  bash benchmarks/gpu_check.sh
#
# Phases (seconds): install 60, kernel tests 70, kernel table 50, training table 90, FSDP2 on
# CUDA 30. Record what comes back in benchmarks/RESULTS.md with env.txt's device and versions.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
dry=${DRY_RUN:-0}

phase() {  # phase NAME SECONDS COMMAND...: run, log to $OUT/NAME.txt, say how it ended
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS
    timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$OUT/phases.txt"
    tail -4 "$OUT/$name.txt"
}

. benchmarks/gpu_common.sh

: > "$OUT/phases.txt"
start=$SECONDS rc=0
if [ "$dry" != 1 ]; then  # a shell function: no `timeout`; pip reads local wheels only
    install_dpfused > "$OUT/install.txt" 2>&1
    rc=$?
fi
echo "install: exit $rc in $((SECONDS - start)) s" | tee -a "$OUT/phases.txt"
environment > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if [ "$dry" = 1 ]; then
    phase kernel_tests 70 python3 -m pytest tests/kernels/test_kernels_ghost_norm.py -q -x \
        -p no:cacheprovider
    phase kernels 50 python3 benchmarks/bench_kernels.py --tiny --out "$OUT"
    phase train 90 python3 benchmarks/bench_train.py --tiny --out "$OUT" --models gpt2-tiny \
        --methods nonprivate dpfused_per_layer dpfused_flat opacus_ghost
else
    # On CUDA: bf16 tolerances and the peak-memory test (the sm_90 compile test runs in CI).
    phase kernel_tests 70 python3 -m pytest tests/kernels -q -x -p no:cacheprovider \
        --ignore=tests/kernels/test_kernels_sm90_compile.py
    phase kernels 50 python3 benchmarks/bench_kernels.py --out "$OUT" --models gpt2-small llama-1b \
        --batch 8 --seq 512 --dtype bfloat16
    phase train 90 python3 benchmarks/bench_train.py --out "$OUT" --models gpt2-small --seq-lens 512 \
        --methods nonprivate dpfused_per_layer dpfused_flat opacus_hooks opacus_ghost --steps 5 \
        --warmup 2
fi
phase fsdp2_cuda 30 torchrun --nproc_per_node 1 benchmarks/bench_fsdp2_cuda.py
echo "done; phases:"; cat "$OUT/phases.txt"
