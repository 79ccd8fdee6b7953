#!/usr/bin/env bash
# Cross-check `rlft pairs` (DPO log-probs/losses, reward-model scores) with transformers + PEFT:
# on each fixture family (llama, qwen2, gpt2, and llama with pad = EOS) trains a DPO and a
# reward-model adapter for a few steps, then runs scripts/preference_check.py.
# usage: scripts/preference_check.sh [PYTHON]
#   PYTHON  an interpreter with torch, transformers, peft (default python3)
#   RLFT    the rlft binary (default target/release/rlft; this script builds nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
RLFT="${RLFT:-target/release/rlft}"
DIR="$(mktemp -d)"
trap 'rm -rf "$DIR"' EXIT
# A tokenizer whose pad is its EOS (as GPT-2's, Llama 3's, Qwen2.5 base's): a score is then
# read at the token before a final EOS, by transformers and by rlft.
cp -r tests/fixtures/llama "$DIR/llama-pad-eos"
"$PY" - "$DIR/llama-pad-eos" <<'PYTHON'
import json, sys
d = sys.argv[1]
for f, key, value in [("config.json", "pad_token_id", 2), ("tokenizer_config.json", "pad_token", "</s>"),
                      ("special_tokens_map.json", "pad_token", "</s>")]:
    c = json.load(open(f"{d}/{f}"))
    c[key] = value
    json.dump(c, open(f"{d}/{f}", "w"), indent=1)
PYTHON
for model in llama qwen2 gpt2 llama-pad-eos; do
    folder="tests/fixtures/$model"
    [ "$model" = llama-pad-eos ] && folder="$DIR/llama-pad-eos"
    for kind in dpo rm; do
        "$RLFT" "$kind" --config "configs/$kind.toml" --set model.path="\"$folder\"" \
            --set training.output_dir="\"$DIR/$model-$kind\"" --set training.max_steps=8 --quiet
    done
    echo "== $model"
    "$PY" scripts/preference_check.py "$RLFT" "$folder" \
        configs/data/sums_prefs_eval.jsonl "$DIR/$model-dpo/adapter" "$DIR/$model-rm/adapter"
done
