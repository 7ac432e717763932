#!/usr/bin/env bash
# GPU smoke test: everything the CPU suite cannot run, in one go on a machine with an NVIDIA GPU (after
# `make install-gpu`, or any Python with torch+CUDA, megatron-core and transformers). Prints one table (check, status,
# seconds, detail) and exits non-zero unless every check passed; without a visible CUDA device it fails at once (a
# GPU check that cannot run is a failure, not a pass). A check whose package is not installed (vLLM, Transformer
# Engine) reports MISSING, which also fails the run.
#
#   bash tools/gpu_smoke.sh [WORK_DIR]     (PYTHON=... picks the interpreter, default .venv/bin/python or python3;
#                                           BENCH_SHAPE=3b|7b|none the bench_grpo shape, default 3b, run under
#                                           BENCH_TIMEOUT seconds, default 1200; its model is kept in WORK_DIR/bench)
#
# Checks: build (the extension compiles with CUDA kernels for this GPU), kernel parity (tools/gpu_checks.py kernels:
# fused log-prob + entropy forward/backward and group advantages on CUDA vs plain torch, fp32 and bf16; then
# tests/kernels), kernel benchmark and bandwidth goal (tools/bench_kernels.py), megatron model parity on CUDA vs
# transformers (local spec; Transformer Engine spec when TE is installed), the trainer on CUDA (the shared-prefix
# parity and GRPO tests with VLMR1_TEST_DEVICE=cuda: transformers rollout engine, megatron training, fused kernels),
# vLLM (rollout, weight sync that changes the output and restores it, sleep frees memory), GRPO (3 steps of a tiny
# Qwen2.5-VL with vLLM rollouts under torchrun), and the GRPO step benchmark (tools/bench_grpo.py, per-row vs
# shared prefix, bf16, MFU against the H100/H200 dense bf16 peak).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
WORK=${1:-$(mktemp -d /tmp/gpu_smoke.XXXXXX)}
mkdir -p "$WORK"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}
RESULTS=$WORK/results.tsv
: > "$RESULTS"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_smoke: FAIL: no CUDA device visible to $PY (torch.cuda.is_available() is False); nothing was tested" >&2
    exit 1
fi

# run NAME CMD...: time a check, keep its log, record PASS/FAIL and the last line it printed
run() {
    local name=$1; shift
    local missing
    for missing in ${NEEDS:-}; do
        if ! "$PY" -c "import $missing" >/dev/null 2>&1; then
            printf '%s\t%s\t%s\t%s\n' "$name" MISSING 0 "python package $missing is not installed" >> "$RESULTS"
            echo "[gpu_smoke] $name: MISSING ($missing is not installed)"
            return
        fi
    done
    local log=$WORK/$name.log start end status
    start=$(date +%s)
    if "$@" > "$log" 2>&1; then status=PASS; else status=FAIL; fi
    end=$(date +%s)
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((end - start))" "$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-90)" >> "$RESULTS"
    echo "[gpu_smoke] $name: $status ($((end - start)) s, log $log)"
}

"$PY" - "$WORK" <<'EOF' > "$WORK/setup.log" 2>&1 || { echo "gpu_smoke: FAIL: could not build the tiny model/data (see $WORK/setup.log)" >&2; exit 1; }
import sys
from pathlib import Path
from tools.make_tiny_model import make_tiny_model
from megatron_vlmr1.data.synthetic import make_rec_dataset
work = Path(sys.argv[1])
make_tiny_model("qwen2_5_vl", work / "tiny", seed=0, num_kv_heads=2)
make_rec_dataset(work / "data", 32, seed=0, difficulty="easy")
EOF

build() {
    local arch
    arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))') &&
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-16} "$PY" setup.py -q build_ext --inplace &&
    "$PY" -c 'from megatron_vlmr1 import kernels; b = kernels.backend("cuda"); print("kernels backend on cuda:", b); assert b == "csrc-cuda", b'
}

kernel_parity() {
    "$PY" tools/gpu_checks.py kernels --device cuda && "$PY" -m pytest -q -x tests/kernels -p no:cacheprovider
}

trainer_on_cuda() {
    VLMR1_TEST_DEVICE=cuda "$PY" -m pytest -q -x -p no:cacheprovider \
        "tests/trainer/test_shared_prefix_parity.py::test_shared_prefix_matches_per_row_tp1" \
        tests/trainer/test_grpo_trainer.py -k "not tensor_parallel"
}

grpo_steps() {
    cat > "$WORK/grpo.yaml" <<EOF
model: {path: $WORK/tiny, dtype: bfloat16}
parallel: {device: cuda}
data: {files: [$WORK/data/train.jsonl], task: rec}
rollout: {engine: vllm, vllm_sleep: true, gpu_memory_utilization: 0.3, max_model_len: 1024, sampling: {max_new_tokens: 32}}
algo: {group_size: 4, beta: 0.04}
rewards: [{name: format, weight: 1.0}, {name: iou, weight: 1.0}]
optim: {lr: 1.0e-4}
train: {output_dir: $WORK/grpo, steps: 3, prompts_per_step: 4, micro_batch_size: 4, tensorboard: false, progress_bar: false}
checkpoint: {export_hf: false}
EOF
    "$(dirname "$PY")/torchrun" --standalone --nproc-per-node 1 -m megatron_vlmr1 train --config "$WORK/grpo.yaml" &&
    "$PY" - "$WORK/grpo/metrics.jsonl" <<'EOF'
import json, math, sys
records = [json.loads(line) for line in open(sys.argv[1])]
assert [r["step"] for r in records] == [1, 2, 3], records
assert all(math.isfinite(r["grad_norm"]) for r in records)
print("GRPO steps:", ", ".join(f"reward {r['reward/mean']:.2f} {r['time/step']:.1f}s" for r in records))
EOF
}

run build build
run kernel_parity kernel_parity
run kernel_bench "$PY" tools/bench_kernels.py --device cuda --dtype bf16 --tp 1 8 --repeat 3
# the issue's goal: >= 2/3 of the device's memory bandwidth for bf16 at Qwen's 151,936 vocabulary
run kernel_bandwidth "$PY" tools/bench_kernels.py --device cuda --dtype bf16 --vocab 151936 --bandwidth-goal 0.667
run model_parity_local "$PY" tools/gpu_checks.py model "$WORK/tiny" --device cuda --backend local
NEEDS=transformer_engine run model_parity_te "$PY" tools/gpu_checks.py model "$WORK/tiny" --device cuda --backend te
run trainer_on_cuda trainer_on_cuda
NEEDS=vllm run vllm_rollout_sync_sleep "$PY" tools/gpu_checks.py vllm "$WORK/tiny"
NEEDS=vllm run grpo_3_steps grpo_steps
if [ "${BENCH_SHAPE:-3b}" != none ]; then
    engine=hf; "$PY" -c 'import vllm' >/dev/null 2>&1 && engine=vllm
    run "bench_grpo_${BENCH_SHAPE:-3b}" timeout "${BENCH_TIMEOUT:-1200}" "$PY" tools/bench_grpo.py \
        --shape "${BENCH_SHAPE:-3b}" --engine $engine --group-size 8 --prompts 8 --max-new-tokens 128 \
        --dtype bfloat16 --device cuda --peak-tflops 989 --workdir "$WORK/bench" --json "$WORK/bench_grpo.json"
fi

echo
"$PY" - "$RESULTS" "$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')" <<'EOF'
import sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
print(f"GPU smoke test on {sys.argv[2]}\n")
print("| check | status | s | detail |\n| --- | --- | ---: | --- |")
for name, status, seconds, detail in rows:
    print(f"| {name} | {status} | {seconds} | {detail.replace('|', '/')} |")
EOF
if grep -qv $'\tPASS\t' "$RESULTS"; then
    echo "gpu_smoke: FAILED (logs in $WORK)" >&2
    exit 1
fi
echo "gpu_smoke: all checks passed (logs in $WORK)"
