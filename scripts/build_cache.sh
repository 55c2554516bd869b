#!/usr/bin/env bash
# Build the artwork embedding cache for a pipeline config (default: the demo world, about 1 minute on 2 CPU cores).
# Run as:  bash scripts/build_cache.sh [CONFIG] [--vision VISION_YAML]
#   CONFIG   a pipeline config (default: configs/default.yaml); its data_dir must hold a dataset
#            (the demo world is generated first when missing)
#   VISION   the vision section (default: configs/vision/default.yaml, the tiny tower adapted on the world)
# Reruns are cheap: the adapted checkpoint is kept while the catalog and settings it was adapted on stay the
# same, and the build resumes / encodes only new or changed artworks.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=configs/default.yaml
VISION=configs/vision/default.yaml
while [ $# -gt 0 ]; do
  case "$1" in
    --vision) VISION="$2"; shift 2 ;;
    -h|--help) awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) CONFIG="$1"; shift ;;
  esac
done
# Idle OpenMP threads sleep instead of spinning: on a 2-core machine shared with DataLoader workers or
# another job, spinning threads were measured to make small CPU forwards 10x slower.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
DATA=$(mmart config "$CONFIG" --get data_dir)
OUT=$(mmart config "$CONFIG" --get output_dir)
start=$SECONDS
stage() { echo; echo "=== [$(( SECONDS - start ))s] $*"; }

# 0. The dataset (normally written by scripts/train.sh's world stage; seconds for the demo world).
if [ ! -f "$DATA/artworks.parquet" ]; then
  stage "world -> $DATA (missing)"
  WORLD_YAML=$(mktemp --suffix=.yaml)
  mmart config "$CONFIG" --section world > "$WORLD_YAML"
  mmart world --config "$WORLD_YAML" --out "$DATA" --no-progress | tail -n 1
  rm -f "$WORLD_YAML"
fi

# 1. Adapt the tower: a short CLIP training on (artwork, caption + tags) pairs (~30-60 s; kept while up to date).
stage "vision adapt ($VISION)"
mmart vision adapt --config "$CONFIG" --vision "$VISION" --data "$DATA" --if-stale --no-progress

# 2. Encode every artwork once: safetensors shards + manifest.json under <output_dir>/cache (~10 s).
stage "cache build -> $OUT/cache"
mmart cache build --config "$CONFIG" --vision "$VISION" --data "$DATA"

# 3. Check what the cache holds: a linear probe must read theme (>= 0.90) and shot (>= 0.85).
stage "cache probe"
mmart cache probe --config "$CONFIG" --vision "$VISION" --data "$DATA" --families theme shot tone title --strict
stage "done in $(( SECONDS - start ))s: $OUT/cache (inspect: mmart cache info $OUT/cache)"
