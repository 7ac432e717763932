#!/usr/bin/env bash
# GRPO on Qwen2.5-VL-32B-Instruct across Slurm nodes: one torchrun per node, one rank per GPU; TP=8 inside a node,
# PP=4 across nodes, data parallel over whatever is left (examples/configs/grpo_32b.yaml; check a layout first with
# `python tools/plan_memory.py --config ... --nodes N --gpus-per-node G --gpu-gib M`).
#
#   sbatch examples/run_grpo_32b.sh [key.sub=value ...]            from the repository root (SLURM_SUBMIT_DIR)
#   CONFIG=my.yaml sbatch --nodes=8 examples/run_grpo_32b.sh train.steps=1000
#   salloc -N4 --gpus-per-node=8 ...; bash examples/run_grpo_32b.sh     inside an allocation (srun is called here)
#   srun -N4 --ntasks-per-node=1 bash examples/run_grpo_32b.sh         already one task per node: torchrun directly
#   bash examples/run_grpo_32b.sh                                      no Slurm: torchrun on this machine
#
# Environment: CONFIG (YAML), VLMR1_ENV_SETUP (a script sourced first: modules, conda, ...) or VENV (a virtualenv
# to activate; default .venv of the repository when present), NPROC_PER_NODE (default: the allocation's GPUs per
# node), MASTER_PORT (default: derived from the job id), SHUTDOWN_TIMEOUT (seconds torchrun waits for its ranks to
# save after a SIGTERM before it kills them; default 840), VLMR1_REPO (the repository, when neither
# SLURM_SUBMIT_DIR nor this script's directory is it).
#
# Preemption: Slurm sends SIGUSR1 to this batch shell 15 minutes before the time limit (--signal=B:USR1@900). The
# shell forwards SIGTERM to the torchrun agents of its step; they forward it to the ranks and wait SHUTDOWN_TIMEOUT
# seconds. The trainer checks for the signal between the phases of a step: it abandons an unfinished step (no update
# applied yet) or finishes the update in flight, writes OUTPUT_DIR/checkpoints/step_N and exits. The shell then
# requeues the job (--requeue); the requeued run (SLURM_RESTART_COUNT=1) resumes from checkpoints/latest and repeats
# the abandoned step exactly. A scheduler preemption (SIGTERM to everything, PreemptMode=REQUEUE) takes the same save
# path and Slurm requeues the job itself. Logs: slurm-JOBID.out (this shell; appended across requeues), and under
# OUTPUT_DIR/logs/job_JOBID_attempt_K/: NODE.log per node and node_I/.../RANK/{stdout,stderr}.log per rank.
#SBATCH --job-name=grpo-32b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@900
set -euo pipefail

# -- the repository (under sbatch, $0 is Slurm's spooled copy of this script) ------------------------------------
is_repo() { [ -n "$1" ] && [ -d "$1/megatron_vlmr1" ] && [ -f "$1/examples/run_grpo_32b.sh" ]; }
REPO=""
for candidate in "${VLMR1_REPO:-}" "${SLURM_SUBMIT_DIR:-}" "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)"; do
    if is_repo "$candidate"; then REPO=$candidate; break; fi
done
if [ -z "$REPO" ]; then
    echo "run_grpo_32b.sh: cannot find the repository: submit from its root or set VLMR1_REPO" >&2
    exit 2
fi
cd "$REPO"

# -- the Python environment ----------------------------------------------------------------------------------------
set +u
if [ -n "${VLMR1_ENV_SETUP:-}" ]; then
    # shellcheck disable=SC1090
    source "$VLMR1_ENV_SETUP"
elif [ -n "${VENV:-}" ]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
elif [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
set -u

# -- the run -------------------------------------------------------------------------------------------------------
CONFIG=${CONFIG:-examples/configs/grpo_32b.yaml}
[ -f "$CONFIG" ] || { echo "run_grpo_32b.sh: CONFIG=$CONFIG does not exist" >&2; exit 2; }
# train.output_dir of the config after the dotted overrides: the run directory that also holds the logs
RUN_DIR=$(python - "$CONFIG" "$@" <<'EOF'
import sys, yaml
with open(sys.argv[1]) as fh:
    out = ((yaml.safe_load(fh) or {}).get("train") or {}).get("output_dir", "runs/default")
for arg in sys.argv[2:]:
    if arg.startswith("train.output_dir="):
        out = arg.split("=", 1)[1]
print(out)
EOF
)
JOB=${SLURM_JOB_ID:-local$$}
LOG_DIR=$RUN_DIR/logs/job_${JOB}_attempt_${SLURM_RESTART_COUNT:-0}
mkdir -p "$LOG_DIR"

# -- the layout ----------------------------------------------------------------------------------------------------
gpus_per_node() {
    local n=${SLURM_GPUS_ON_NODE:-}
    [ -n "$n" ] || n=${SLURM_GPUS_PER_NODE:-}
    n=${n##*:}                                    # "h100:8" -> 8
    if [ -z "$n" ] && command -v nvidia-smi >/dev/null; then n=$(nvidia-smi -L | wc -l); fi
    echo "${n:-0}"
}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(gpus_per_node)}
if ! [ "$NPROC_PER_NODE" -ge 1 ] 2>/dev/null; then
    echo "run_grpo_32b.sh: no GPUs in the allocation (--gpus-per-node) and none visible; set NPROC_PER_NODE" >&2
    exit 2
fi
NNODES=${SLURM_NNODES:-1}
if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    MASTER_ADDR=$(scontrol show node "$FIRST_NODE" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
    MASTER_ADDR=${MASTER_ADDR:-$FIRST_NODE}
else
    MASTER_ADDR=127.0.0.1
fi
# one port per job, stable across requeues; another job sharing the first node gets another one
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-$$} % 20000))}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-840}
# Since Slurm 22.05 srun does not inherit --cpus-per-task: without this every rank of a node shares one core
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( SLURM_CPUS_PER_TASK / NPROC_PER_NODE > 0 ? SLURM_CPUS_PER_TASK / NPROC_PER_NODE : 1 ))}
fi
export CUDA_DEVICE_MAX_CONNECTIONS=1      # megatron's TP/SP overlap needs ordered kernel launches
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export PYTHONUNBUFFERED=1
export RUN_DIR LOG_DIR NNODES NPROC_PER_NODE MASTER_ADDR MASTER_PORT SHUTDOWN_TIMEOUT JOB CONFIG

echo "[$(date '+%F %T')] run_grpo_32b: job $JOB attempt ${SLURM_RESTART_COUNT:-0}: $NNODES node(s) x" \
     "$NPROC_PER_NODE rank(s), rendezvous $MASTER_ADDR:$MASTER_PORT, config $CONFIG, run dir $RUN_DIR, logs $LOG_DIR"

# One torchrun per node; its per-rank logs go to LOG_DIR/node_<SLURM_NODEID>. Arguments: the dotted overrides.
# shellcheck disable=SC2016
NODE_LAUNCH='exec torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$JOB" --max-restarts 0 \
    --shutdown-timeout "$SHUTDOWN_TIMEOUT" --log-dir "$LOG_DIR/node_${SLURM_NODEID:-0}" --redirects 3 --tee 3 \
    -m megatron_vlmr1 train --config "$CONFIG" "$@"'

if [ -z "${SLURM_JOB_ID:-}" ] || [ -n "${SLURM_STEP_ID:-}" ]; then
    # no Slurm, or already a task of an srun step: this process is the node's launcher
    bash -c "$NODE_LAUNCH" torchrun "$@"
    exit $?
fi

# -- batch shell or salloc shell: one task per node, and the preemption path ----------------------------------------
PREEMPT_SIGNAL=""
on_signal() {
    [ -z "$PREEMPT_SIGNAL" ] || return 0
    PREEMPT_SIGNAL=$1
    echo "[$(date '+%F %T')] run_grpo_32b: $1: asking the ranks to save (SIGTERM to the job's steps; torchrun" \
         "waits up to ${SHUTDOWN_TIMEOUT}s)"
    # the steps only (not this shell): their torchrun agents forward SIGTERM to the ranks
    scancel --signal=TERM "$SLURM_JOB_ID" || true
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --output="$LOG_DIR/%N.log" \
    bash -c "$NODE_LAUNCH" torchrun "$@" &
SRUN_PID=$!
RC=0
while true; do
    wait "$SRUN_PID" && RC=0 || RC=$?            # a trapped signal interrupts wait: wait again
    kill -0 "$SRUN_PID" 2>/dev/null || break
done

if [ "$PREEMPT_SIGNAL" = USR1 ]; then
    echo "[$(date '+%F %T')] run_grpo_32b: ranks exited ($RC); checkpoint:" \
         "$(cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || echo none); requeueing job $SLURM_JOB_ID"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0                                    # Slurm ends this shell; the requeued job resumes from latest
    fi
    echo "run_grpo_32b.sh: requeue failed (an salloc allocation cannot be requeued); resubmit to resume" >&2
fi
exit "$RC"
