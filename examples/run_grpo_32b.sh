#!/usr/bin/env bash
# GRPO on Qwen2.5-VL-32B-Instruct across Slurm nodes (8 GPUs each): TP=8 inside a node, PP=4 across nodes,
# data parallel over whatever is left. Submit with `sbatch examples/run_grpo_32b.sh` or run `bash examples/run_grpo_32b.sh`
# inside an allocation. Extra arguments are dotted config overrides, e.g. `train.steps=500 optim.lr=5e-7`.
#SBATCH --job-name=grpo-32b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --signal=TERM@300          # preemption: SIGTERM 5 min before the end, the trainer saves and exits
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-examples/configs/grpo_32b.yaml}
NNODES=${SLURM_NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || echo localhost)}
MASTER_PORT=${MASTER_PORT:-29500}

export CUDA_DEVICE_MAX_CONNECTIONS=1      # megatron's TP/SP overlap needs ordered kernel launches
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

LAUNCH=(torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE"
        --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${SLURM_JOB_ID:-local}"
        -m megatron_vlmr1 train --config "$CONFIG" "$@")

if [ -n "${SLURM_JOB_ID:-}" ]; then
    srun --kill-on-bad-exit=1 "${LAUNCH[@]}"
else
    "${LAUNCH[@]}"
fi
