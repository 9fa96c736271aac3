#!/usr/bin/env bash
# Everything issues 4 and 5 measure, in device calls that each fit the 10-minute limit.
#
#   bash benchmarks/gpu_wheels.sh                      # here, once
#   device run, carry [".whl"]:  bash benchmarks/gpu_session.sh kernels    # tests + kernel bench
#   device run, carry [".whl"]:  bash benchmarks/gpu_session.sh gpt2       # GPT-2 training rows
#   device run, carry [".whl"]:  bash benchmarks/gpu_session.sh llama      # Llama-1B + ResNet rows
#
# Output goes to $OUT (the device tool's folder; benchmarks/out elsewhere): env.txt, the logs, and
# the scripts' JSON/PNG. Every phase stops itself before the call's limit; train.py appends each
# finished cell to train.partial.jsonl, so a cut-off run keeps what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

. benchmarks/gpu_common.sh
install() {
    install_dpfused || exit 1
    environment > "$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
}

phase=${1:-kernels}
install
case "$phase" in
    kernels)
        # The kernel tests on the GPU (bf16 tolerances, the 5% peak-memory test), then the table.
        timeout 240 python3 -m pytest tests/kernels -q -p no:cacheprovider -x \
            > "$OUT/kernel_tests.txt" 2>&1
        echo "kernel tests: exit $?"; tail -3 "$OUT/kernel_tests.txt"
        timeout 300 python3 benchmarks/bench_kernels.py --out "$OUT" 2>&1 | tee "$OUT/kernels.txt"
        ;;
    gpt2)
        timeout 560 python3 benchmarks/bench_train.py --out "$OUT" \
            --models gpt2-medium-untied gpt2-small gpt2-medium --seq-lens 512 128 1024 \
            2>&1 | tee "$OUT/train_gpt2.txt"
        ;;
    llama)
        timeout 560 python3 benchmarks/bench_train.py --out "$OUT" --models llama-1b resnet18-gn \
            --seq-lens 512 128 1024 2>&1 | tee "$OUT/train_llama.txt"
        ;;
    *)
        echo "unknown phase '$phase': use kernels, gpt2 or llama" >&2
        exit 2
        ;;
esac
