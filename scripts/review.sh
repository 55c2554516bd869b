#!/usr/bin/env bash
# Review an existing model: image grids of its choices for a sample of test members, and one HTML page.
# Run as:  bash scripts/review.sh MODEL_DIR DATASET OUT_DIR [more `mmart review` options]
#   e.g.   bash scripts/review.sh outputs/default/dpo/model data/world outputs/default/review --only losses
# Scores only the sampled members' pairs with the model (add --preds FILE to reuse `mmart predict`
# output instead), draws OUT_DIR/grids/*.png and writes OUT_DIR/index.html; `mmart review --help` lists
# the options (--members, --split, --seed, --only wins|losses, --title, --genre, --member).
set -euo pipefail
if [ $# -lt 3 ] || [ "$1" = -h ] || [ "$1" = --help ]; then sed -n '2,7p' "$0"; exit 2; fi
MODEL=$1 DATA=$2 OUT=$3
shift 3
mmart review --model "$MODEL" --data "$DATA" --out "$OUT" --members 8 --split test "$@"
echo "open in a browser: $OUT/index.html"
