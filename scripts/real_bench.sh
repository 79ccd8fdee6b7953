#!/usr/bin/env bash
# rlft beside PyTorch + PEFT / TRL on the real model (issues 23 and 24): W5 (one LoRA SFT step,
# B=4 x 256, r=16 all-linear; with and without gradient checkpointing), W6 (decode B=8) and W7 (one
# GRPO step: 4 chat prompts x 8 completions of 24 tokens, beside TRL's GRPOTrainer) on
# SmolLM2-135M-Instruct, f32 and bf16, one after the other on the same weights: rlft reads the GGUF
# (`rlft bench --model FILE.gguf`), PyTorch the folder rlft converted it into (the same dequantized
# f32 tensors). One JSON line per run on stdout.
# Usage: PEER_VENV=/path/to/venv bash scripts/real_bench.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-3}
PY=${PEER_VENV:?set PEER_VENV to the peer venv (../shared/peer/setup.sh)}/bin/python
GGUF=$(bash scripts/fetch_real_model.sh)
RLFT=target/release/rlft
# The converted folder: the path rlft prints for a GGUF it has read.
DIR=$(RUST_LOG=info $RLFT logprobs --model "$GGUF" --text x --json 2>&1 >/dev/null | sed -n 's/.* into //p' | tail -1)
if [ -z "$DIR" ]; then
    DIR=$(ls -d "${RLFT_GGUF_CACHE:-$HOME/.cache/rlft/gguf}"/SmolLM2-135M-Instruct.Q4_1-* | head -1)
fi
for D in f32 bf16; do
    $RLFT bench --model "$GGUF" --workload W5 --dtype "$D" --steps "$STEPS" --json 2>/dev/null
    "$PY" scripts/scale_bench.py "$DIR" --workload W5 --dtype "$D" --steps "$STEPS" 2>/dev/null
    $RLFT bench --model "$GGUF" --workload W5 --dtype "$D" --steps "$STEPS" --gradient-checkpointing --json 2>/dev/null
    "$PY" scripts/scale_bench.py "$DIR" --workload W5 --dtype "$D" --steps "$STEPS" --gc 2>/dev/null
    $RLFT bench --model "$GGUF" --workload W6 --dtype "$D" --steps "$STEPS" --json 2>/dev/null
    "$PY" scripts/scale_bench.py "$DIR" --workload W6 --dtype "$D" --steps "$STEPS" 2>/dev/null
    $RLFT bench --model "$GGUF" --workload W7 --dtype "$D" --steps "$STEPS" --json 2>/dev/null
    "$PY" scripts/trl_bench.py --workload W7 --model "$DIR" --dtype "$D" --steps "$STEPS" 2>/dev/null
done
