#!/usr/bin/env bash
# The GPU checks of the performance issue as one run, each step under a time limit (8.7 minutes of step limits, plus
# about 30 s of wheel install and imports: one device call of at most 10 minutes):
#   1. tests/test_gpu.py: bf16 training, packing on CUDA, Liger's fused loss (flash-attn's varlen path if installed);
#   2. SFT against LLaVA-OneVision at Qwen2.5-0.5B + SigLIP-so400m shapes, 16 frames (peer ratio, feature cache, MFU);
#   3. the Qwen2.5-7B shapes at 32 frames, micro-batch 1: MFU of ours and the peer, no activation checkpointing;
#   4. the same, ours alone with gradient checkpointing: peak GPU memory (target <= 24 GB).
# Carry .whl (bench/fetch_gpu_wheels.sh) with the working tree. Results: $OUT (or bench/results/gpu) holds the log and
# one JSON per benchmark; copy the tables into bench/RESULTS.md with the date and the device.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
exec > >(tee "$out/gpu_checks.log") 2>&1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep going after a failure, remember it
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
    timeout "$limit" "$@" || { echo "=== $name FAILED (exit $?)"; status=1; }
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# Every package the steps import, before any step runs: a missing wheel shows here in one line, not as four failures.
python3 -c "import torch, transformers, peft, trl, datasets, av, videollm, videollm.train.sft; \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', \
trl.__version__, 'datasets', datasets.__version__, 'av', av.__version__)" || { echo "=== imports FAILED: carry .whl (bench/fetch_gpu_wheels.sh)"; exit 1; }
step "GPU tests" 130 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py
step "SFT 0.5B shapes" 150 python3 bench/bench_sft.py --preset qwen2.5-0.5b --steps 5 --json "$out/sft_0.5b.json"
step "SFT 7B shapes, 32 frames" 150 python3 bench/bench_sft.py --preset qwen2.5-7b --frames 32 --steps 5 \
    --json "$out/sft_7b_32f.json"
step "SFT 7B shapes, 32 frames, memory" 90 python3 bench/bench_sft.py --preset qwen2.5-7b --frames 32 --steps 3 \
    --variants "ours, padded" --gradient_checkpointing --json "$out/sft_7b_32f_memory.json"
exit $status
