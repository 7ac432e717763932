#!/usr/bin/env bash
# The CPU demo (`make demo`): tiny Qwen2.5-VL + synthetic REC data (`--difficulty locate`: one shape per image, in
# one quadrant, over a background whose colour codes x and y), a short SFT warm-up that teaches the answer format,
# then GRPO that teaches where the shape is. Writes runs/demo/{metrics.jsonl,reward_curve.png,checkpoints/,hf/}.
# About 4 minutes on 2 idle cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p runs/demo
[ -f runs/demo/base_model/config.json ] || $PY tools/make_tiny_model.py --arch qwen2_5_vl --out runs/demo/base_model --seed 0
[ -f runs/demo/data_locate/train.jsonl ] || $PY tools/make_synthetic_data.py --task rec --out runs/demo/data_locate \
    --n 512 --seed 0 --difficulty locate
rm -rf runs/demo/sft runs/demo/checkpoints runs/demo/metrics.jsonl runs/demo/tensorboard
$PY -m megatron_vlmr1 sft --config examples/configs/demo_sft.yaml
$PY -m megatron_vlmr1 train --config examples/configs/demo_grpo.yaml
$PY tools/summarize_run.py runs/demo/metrics.jsonl --window 20  # the first and the last 20% of the GRPO steps
