#!/usr/bin/env bash
# Download, HERE (a machine with the package registries), the wheels the GPU machine lacks.
# The device image has torch, triton, transformers, peft, accelerate, matplotlib, scipy, absl-py,
# attrs, wrapt, numpy, pytest, hypothesis (KINDS.md); it has no dp-accounting, dm-tree or opacus,
# and cannot reach a registry. Python there is 3.12 on x86-64.
#
#   bash benchmarks/gpu_wheels.sh        # writes .whl/ (git-ignored)
#   then carry ".whl" in each device call of benchmarks/gpu_session.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl dp-accounting==0.6.0 dm-tree==0.1.10 opacus==1.6.0
ls -l .whl
