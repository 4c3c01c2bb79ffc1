#!/usr/bin/env bash
# Multi-node training under SLURM: one `accelerate launch` per node, rendezvous on the first node.
#   mkdir -p logs   # SLURM writes the job's output there and does not create the folder
#   sbatch launch/slurm_multinode.sh recipes/sft.py --config recipes/configs/sft_siglip_qwen2.5_7b.yaml \
#       --train_file data/my_videos/train.jsonl --video_root data/my_videos
# ACCELERATE_CONFIG (default launch/zero3.yaml), GPUS_PER_NODE (8) and MAIN_PORT (29500) override the defaults.
#SBATCH --job-name=videollm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launch/zero3.yaml}
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
# The recipe's arguments, quoted again for the inner shell (a value with spaces, such as a JSON `synonyms`, survives).
ARGS=$(printf '%q ' "$@")

srun --kill-on-bad-exit=1 bash -c "accelerate launch \
  --config_file $ACCELERATE_CONFIG \
  --num_machines $SLURM_NNODES \
  --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID \
  --main_process_ip $MAIN_ADDR \
  --main_process_port $MAIN_PORT \
  $ARGS"
