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

install() {
    local site=/tmp/dpfused-site
    if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" \
            .whl/*.whl || exit 1
    fi
    export PYTHONPATH="$site"
    # Editable, as CI installs it.
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
    {
        date -u
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
        python3 -c "import sys, torch, triton, opacus, transformers, dpfused; \
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'opacus', opacus.__version__, 'transformers', \
transformers.__version__, 'dpfused', dpfused.__version__, dpfused.__file__)"
    } > "$OUT/env.txt" 2>&1
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
        timeout 300 python3 benchmarks/kernels.py --out "$OUT" 2>&1 | tee "$OUT/kernels.txt"
        ;;
    gpt2)
        timeout 560 python3 benchmarks/train.py --out "$OUT" \
            --models gpt2-medium-untied gpt2-small gpt2-medium --seq-lens 512 128 1024 \
            2>&1 | tee "$OUT/train_gpt2.txt"
        ;;
    llama)
        timeout 560 python3 benchmarks/train.py --out "$OUT" --models llama-1b resnet18-gn \
            --seq-lens 512 128 1024 2>&1 | tee "$OUT/train_llama.txt"
        ;;
    *)
        echo "unknown phase '$phase': use kernels, gpt2 or llama" >&2
        exit 2
        ;;
esac
