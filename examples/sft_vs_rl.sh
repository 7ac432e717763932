#!/usr/bin/env bash
# The seed's experiment in miniature (VLM-R1: "SFT memorises, RL generalises"; map_len stops OVD reward hacking).
#
# One shared start checkpoint (a short SFT warm-up on REC + OVD, so every arm starts from the same weights and
# already answers in the R1 format), then, for the same budget (STEPS steps of PROMPTS prompts each):
#   REC: SFT vs GRPO (rec_format + iou) on the same training set;
#   OVD: GRPO with `ap` vs GRPO with `map_len` (AP times the redundancy penalty).
# Every EVAL_EVERY steps each arm's weights are exported and scored by `python -m megatron_vlmr1 eval` (greedy) on
# `test` (in-domain) and `test_ood` (colour x shape pairs never asked about in training) for REC, on `test` for OVD.
# tools/sft_vs_rl_report.py then writes OUT/report.md and OUT/{rec,ovd}_curves.png from those eval reports only.
#
# Usage: PY=.venv/bin/python bash examples/sft_vs_rl.sh        (defaults: ~20-30 minutes on 2 CPU cores)
# Knobs (environment): OUT STEPS EVAL_EVERY PROMPTS MICRO N N_TEST DIFFICULTY WARMUP_STEPS WARMUP_PROMPTS GROUP
# BASE_MODEL SEED
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=${OUT:-runs/sft_vs_rl}
STEPS=${STEPS:-60}
EVAL_EVERY=${EVAL_EVERY:-20}
PROMPTS=${PROMPTS:-8}
N=${N:-512}
N_TEST=${N_TEST:-100}
DIFFICULTY=${DIFFICULTY:-easy}
WARMUP_STEPS=${WARMUP_STEPS:-60}
WARMUP_PROMPTS=${WARMUP_PROMPTS:-16}
MICRO=${MICRO:-16}
GROUP=${GROUP:-8}
SEED=${SEED:-0}
BASE_MODEL=${BASE_MODEL:-$OUT/base_model}
QUIET=(train.tensorboard=false train.progress_bar=false)

if (( STEPS % EVAL_EVERY )); then echo "STEPS=$STEPS must be a multiple of EVAL_EVERY=$EVAL_EVERY" >&2; exit 2; fi
mkdir -p "$OUT"
[ -f "$BASE_MODEL/config.json" ] || $PY tools/make_tiny_model.py --arch qwen2_5_vl --out "$BASE_MODEL" --seed "$SEED"
for task in rec ovd; do
  [ -f "$OUT/data/$task/train.jsonl" ] || $PY tools/make_synthetic_data.py --task $task --out "$OUT/data/$task" \
      --n "$N" --n-test "$N_TEST" --seed "$SEED" --difficulty "$DIFFICULTY"
done
REC=$OUT/data/rec
OVD=$OUT/data/ovd
cat > "$OUT/eval_rec.yaml" <<EOF
task: rec
splits:
  - {name: test, data: $REC/test.jsonl, image_root: $REC}
  - {name: test_ood, data: $REC/test_ood.jsonl, image_root: $REC}
model: {engine: hf, device: cpu, max_new_tokens: 48}
EOF
cat > "$OUT/eval_ovd.yaml" <<EOF
task: ovd
splits:
  - {name: test, data: $OVD/test.jsonl, coco_gt: $OVD/test_coco.json, image_root: $OVD}
model: {engine: hf, device: cpu, max_new_tokens: 96}
EOF

evaluate() {  # evaluate TASK MODEL_DIR REPORT_DIR
  mkdir -p "$3"
  $PY -m megatron_vlmr1 eval --config "$OUT/eval_$1.yaml" model.path="$2" output="$3/report.json" > "$3/eval.log"
}

# 1. The shared start: a short SFT warm-up on both tasks (format + a first guess), evaluated once as step 0.
if [ ! -f "$OUT/start/hf/config.json" ]; then
  $PY -m megatron_vlmr1 sft --config examples/configs/sft_vs_rl_sft.yaml model.path="$BASE_MODEL" \
      "data.files=[$REC/train.jsonl,$OVD/train.jsonl]" data.task=rec train.output_dir="$OUT/start" \
      train.steps="$WARMUP_STEPS" train.prompts_per_step="$WARMUP_PROMPTS" train.micro_batch_size="$MICRO" \
      train.seed="$SEED" checkpoint.save_interval=0 "${QUIET[@]}"
fi
evaluate rec "$OUT/start/hf" "$OUT/evals/rec/start"
evaluate ovd "$OUT/start/hf" "$OUT/evals/ovd/start"

# 2. The arms, trained EVAL_EVERY steps at a time (each chunk resumes the arm's checkpoint and exports its weights).
COMMON=(model.path="$OUT/start/hf" train.prompts_per_step="$PROMPTS" train.micro_batch_size="$MICRO"
        train.seed="$SEED" checkpoint.save_interval=0
        checkpoint.keep_last=1 optim.lr_schedule=constant optim.warmup_steps=0 "${QUIET[@]}")
for (( step = EVAL_EVERY; step <= STEPS; step += EVAL_EVERY )); do
  tag=$(printf "step_%04d" "$step")
  $PY -m megatron_vlmr1 sft --config examples/configs/sft_vs_rl_sft.yaml "${COMMON[@]}" \
      "data.files=[$REC/train.jsonl]" train.output_dir="$OUT/rec_sft" train.steps="$step"
  evaluate rec "$OUT/rec_sft/hf" "$OUT/evals/rec/sft/$tag"
  $PY -m megatron_vlmr1 train --config examples/configs/sft_vs_rl_grpo.yaml "${COMMON[@]}" algo.group_size="$GROUP" \
      "data.files=[$REC/train.jsonl]" train.output_dir="$OUT/rec_grpo" train.steps="$step"
  evaluate rec "$OUT/rec_grpo/hf" "$OUT/evals/rec/grpo/$tag"
  for reward in ap map_len; do
    $PY -m megatron_vlmr1 train --config examples/configs/sft_vs_rl_grpo.yaml "${COMMON[@]}" algo.group_size="$GROUP" \
        "data.files=[$OVD/train.jsonl]" data.task=ovd rollout.sampling.max_new_tokens=96 \
        "rewards=[{name: format, weight: 1.0}, {name: $reward, weight: 1.0}]" \
        train.output_dir="$OUT/ovd_$reward" train.steps="$step"
    evaluate ovd "$OUT/ovd_$reward/hf" "$OUT/evals/ovd/$reward/$tag"
  done
done

# 3. The report: numbers read from the eval reports above, never from the trainers' logs.
$PY tools/sft_vs_rl_report.py "$OUT"
