#!/usr/bin/env bash
# Run HERE (a machine with the package registry) before bench/gpu_checks.sh: downloads the wheels the GPU machine lacks
# into .whl/ (git-ignored), for its Python 3.12 on x86-64. Its image already has torch, transformers, peft, accelerate,
# safetensors, numpy and pytest; the SFT benchmark and tests/test_gpu.py also need PyAV (videollm.data.video imports
# it) and liger-kernel (the fused loss that the GPU path uses when installed).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "av==18.1.0" "liger-kernel==0.8.5"
ls -l .whl
