#!/usr/bin/env bash
# Issue 7's CPU comparison in one run: the PyTorch/TRL peer, then `rlft bench`, one process
# at a time, on an otherwise idle machine. Prints one JSON line per measurement.
# usage: scripts/side_by_side.sh PEER_VENV [TRL112_DIR] [PEER_DIR]
#   PEER_VENV  a venv from ../shared/peer/setup.sh (torch, transformers, peft, trl >= 1.16)
#   TRL112_DIR a `pip install --target` folder with trl 1.12 (PPOTrainer, for W3)
#   PEER_DIR   the peer's scripts (default ../shared/peer)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:?usage: side_by_side.sh PEER_VENV [TRL112_DIR] [PEER_DIR]}/bin/python"
TRL112="${2:-}"
PEER="${3:-../shared/peer}"
cargo build --release -q
$PY "$PEER/train_step_bench.py" 2>/dev/null | tail -1 | sed 's/^{/{"impl": "pytorch-W1", /'
$PY "$PEER/generate_bench.py" 2>/dev/null | tail -1 | sed 's/^{/{"impl": "pytorch-W2", /'
$PY "$PEER/generate_bench.py" --peft 2>/dev/null | tail -1 | sed 's/^{/{"impl": "pytorch-W2-peft", /'
$PY scripts/trl_bench.py --workload W4 --peer-dir "$PEER" 2>/dev/null | tail -1
if [ -n "$TRL112" ]; then
    PYTHONPATH="$TRL112" $PY scripts/trl_bench.py --workload W3 --peer-dir "$PEER" 2>/dev/null | tail -1
fi
./target/release/rlft bench --json | sed 's/^{/{"impl": "rlft", /'
