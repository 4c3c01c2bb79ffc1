#!/usr/bin/env bash
# Run HERE (a machine with the package registry) before bench/gpu_checks.sh: downloads the wheels the GPU machine lacks
# into .whl/ (git-ignored), for its Python 3.12 on x86-64. Its image has torch 2.11, transformers 5.17, accelerate,
# safetensors, huggingface_hub 1.33, tokenizers 0.23, pandas, pyarrow, xxhash, fsspec, numpy and pytest, but
# - videollm needs a newer transformers than 5.17 (transformers.configuration_utils.SubConfigSpec): the version the CPU
#   suite passes with is carried (it installs over the image's: gpu_checks.sh puts the carried wheels first);
# - tests/test_gpu.py imports videollm.train (trl, which imports datasets; datasets needs dill and multiprocess);
# - peft is carried at the tested version (the image's is not known);
# - PyAV (videollm.data.video imports it) and liger-kernel (the fused loss the GPU path uses when installed).
# About 50 MB in all (PyAV 36 MB); the device tool carries at most 64 MiB with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
# The versions installed in .venv, where the CPU suite passes (liger-kernel is GPU-only: pinned here).
CARRIED="transformers peft trl datasets dill multiprocess av"
pins=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" $CARRIED)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $pins "liger-kernel==0.8.5"
ls -l .whl
du -sh .whl
