#!/usr/bin/env bash
# Macro F1 against training pairs from the checkpoints of one SFT run (issue 13, "learning curve"): each
# checkpoint-N of RUN gets the final model's she.json (prompt style, schema, target), is calibrated on the
# validation pairs of DATA_CONFIG's split and evaluated on its test pairs; a line per checkpoint goes to
# RUN/learning_curve.tsv (step, pairs seen, raw and calibrated Macro F1). One epoch's checkpoints are points of
# one run, not separate runs: the learning rate had not finished its decay at the earlier ones.
#
#   scripts/learning_curve.sh runs/compare-hd-label-only/label_only_sft configs/compare-cpu-label-only.yaml 8 16
#
# args: RUN (holds final/ and checkpoint-*/), DATA_CONFIG, BATCH (pairs per optimizer step of the run: per-device
# batch x gradient accumulation x processes, for the pairs-seen column), MAX_NEW_TOKENS (16 for a label-only model, 80 for reasoning)
set -euo pipefail
run=$1 data_config=$2 batch=$3 max_new=$4
out="$run/learning_curve.tsv"
printf "step\tpairs\tmacro_f1\tmacro_f1_calibrated\n" > "$out"
for ckpt in $(printf '%s\n' "$run"/checkpoint-* | sort -V); do
  step=${ckpt##*-}
  cp "$run/final/she.json" "$ckpt/she.json"
  she calibrate --model "$ckpt" --data-config "$data_config" --batch-size 32 --max-new-tokens "$max_new" > "$ckpt/calibrate.log" 2>&1
  she eval --model "$ckpt" --out "$ckpt/eval" --data-config "$data_config" --batch-size 32 \
    --max-new-tokens "$max_new" > "$ckpt/eval.log" 2>&1
  python - "$ckpt/eval/metrics.json" "$step" "$batch" >> "$out" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
raw = m.get("uncalibrated", m)["macro_f1"]
print(f"{sys.argv[2]}\t{int(sys.argv[2]) * int(sys.argv[3])}\t{raw:.4f}\t{m['macro_f1']:.4f}")
EOF
done
cat "$out"
