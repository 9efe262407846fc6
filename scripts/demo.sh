#!/usr/bin/env bash
# The whole loop on the built-in base from the command line: train a style LoRA on an
# example dataset, then draw the same prompt at several strengths.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DATA=${1:-datasets/neon}
lora=$($PY -m sdlora.cli train --data "$DATA" --output-dir outputs | tail -n 1)
run=$(dirname "$lora")
trigger=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['data']['trigger'])" "$run/config.json")
for s in 0 0.5 1; do
  $PY -m sdlora.cli generate --lora "$lora:$s" --prompt "$trigger, a large red circle in the center" \
      --seed 1 --out "$run/demo/strength-$s.png" >/dev/null
done
echo "LoRA: $lora"
echo "images at strengths 0, 0.5, 1: $run/demo/"
