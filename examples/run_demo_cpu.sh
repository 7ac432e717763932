#!/usr/bin/env bash
# The CPU demo (`make demo`): tiny Qwen2.5-VL + synthetic REC data, a short SFT warm-up, then GRPO.
# Writes runs/demo/{metrics.jsonl,reward_curve.png,checkpoints/,hf/}. About 5-8 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p runs/demo
[ -f runs/demo/base_model/config.json ] || $PY tools/make_tiny_model.py --arch qwen2_5_vl --out runs/demo/base_model --seed 0
[ -f runs/demo/data/train.jsonl ] || $PY tools/make_synthetic_data.py --task rec --out runs/demo/data --n 512 --seed 0 --difficulty easy
rm -rf runs/demo/sft runs/demo/checkpoints runs/demo/metrics.jsonl runs/demo/tensorboard
$PY -m megatron_vlmr1 sft --config examples/configs/demo_sft.yaml
$PY -m megatron_vlmr1 train --config examples/configs/demo_grpo.yaml
$PY tools/summarize_run.py runs/demo/metrics.jsonl --window 5
