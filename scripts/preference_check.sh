#!/usr/bin/env bash
# Cross-check `rlft pairs` (DPO log-probs/losses, reward-model scores) with transformers + PEFT:
# on each fixture family (llama, qwen2, gpt2) trains a DPO and a reward-model adapter for a few
# steps, then runs scripts/preference_check.py.
# usage: scripts/preference_check.sh [PYTHON]
#   PYTHON  an interpreter with torch, transformers, peft (default python3)
#   RLFT    the rlft binary (default target/release/rlft; this script builds nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
RLFT="${RLFT:-target/release/rlft}"
DIR="$(mktemp -d)"
trap 'rm -rf "$DIR"' EXIT
for model in llama qwen2 gpt2; do
    for kind in dpo rm; do
        "$RLFT" "$kind" --config "configs/$kind.toml" --set model.path="\"tests/fixtures/$model\"" \
            --set training.output_dir="\"$DIR/$model-$kind\"" --set training.max_steps=8 --quiet
    done
    echo "== $model"
    "$PY" scripts/preference_check.py "$RLFT" "tests/fixtures/$model" \
        configs/data/sums_prefs_eval.jsonl "$DIR/$model-dpo/adapter" "$DIR/$model-rm/adapter"
done
