#!/usr/bin/env bash
# Issue 13's real-size comparison in one run: rlft and its PyTorch twin (scripts/scale_bench.py,
# transformers + PEFT) on the SAME model folder, one process at a time, on an otherwise idle machine.
# The folder (Qwen2.5-0.5B's exact shape, 494 M random parameters, f32, 2 GB) is written once by
# `rlft bench --shape qwen2.5-0.5b --write-model`; pass MODEL_DIR to measure another folder instead.
#
# usage: scripts/side_by_side_scale.sh PEER_VENV [WORK] [MODEL_DIR]
#   PEER_VENV  a venv with torch, transformers, peft (e.g. from ../shared/peer/setup.sh)
#   WORK       scratch folder (default: $TMPDIR/rlft-scale); the model and the JSON lines go here
# env: ROWS   the rows to run (default: all), from W5-f32 W5-bf16 W5-f32-gc W5-bf16-gc W6-f32 W6-bf16;
#             a k-bit base (QLoRA, issue 15) by a suffix: W5-bf16-gc-nf4, W5-f32-nf4, W6-bf16-nf4 (rlft
#             --quantization, PyTorch bitsandbytes + prepare_model_for_kbit_training; 4-bit with double
#             quantization)
#      STEPS  measured steps / generate calls per row after one warm-up (default 3)
#      SIDES  which sides to run (default: "rlft pytorch")
#      PT_BF16_STEPS  measured steps of the PyTorch bf16 rows, without a warm-up (default: STEPS after
#             one warm-up). PyTorch's bf16 GEMM on an AVX2-only CPU (no AVX-512-BF16/AMX) is ~7x slower
#             than its f32 one: a W5 bf16 step takes many minutes there.
#      TIMEOUT  seconds each process may run (default 0: no limit); a timed-out one is recorded as skipped
#      QUIET_WAIT  before each process wait up to this many seconds for 10 quiet seconds (< 0.15
#             cores busy machine-wide; for a shared machine; default 0: start at once)
# Prints one JSON line per measurement (also kept in WORK/side_by_side_scale.jsonl), then a table.
# A row rlft cannot run in this build (gradient checkpointing) is recorded as skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${1:?usage: side_by_side_scale.sh PEER_VENV [WORK] [MODEL_DIR]}"
PY="$VENV/bin/python"
WORK="${2:-${TMPDIR:-/tmp}/rlft-scale}"
MODEL="${3:-$WORK/qwen2.5-0.5b}"
STEPS="${STEPS:-3}"
ROWS="${ROWS:-W5-f32 W5-bf16 W5-f32-gc W5-bf16-gc W6-f32 W6-bf16}"
OUT="$WORK/side_by_side_scale.jsonl"
SIDES="${SIDES:-rlft pytorch}"
TIMEOUT="${TIMEOUT:-0}"
mkdir -p "$WORK"
cargo build --release -q || exit 1
RLFT=./target/release/rlft
if [ ! -f "$MODEL/model.safetensors" ]; then
    $RLFT bench --shape qwen2.5-0.5b --write-model "$MODEL" >&2 || exit 1
fi
: > "$OUT"
emit() { # ROW LINE: tag a JSON line with its row, print it and keep it
    local line="{\"row\": \"$1\", \"loadavg_before\": $2, ${3#\{}"
    echo "$line"; echo "$line" >> "$OUT"
}
quiet() { # wait (up to QUIET_WAIT s) until 10 s pass with under 0.15 cores busy
    [ "${QUIET_WAIT:-0}" -gt 0 ] || return 0
    local t0=$SECONDS busy
    while [ $((SECONDS - t0)) -lt "$QUIET_WAIT" ]; do
        busy=$($PY -c '
import os, time
def b():
    v = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    return sum(v) - v[3] - v[4]
a = b(); time.sleep(10); print((b() - a) / os.sysconf("SC_CLK_TCK") / 10)')
        $PY -c "import sys; sys.exit(0 if $busy < 0.15 else 1)" && return 0
        echo "waiting for a quiet machine ($busy cores busy)" >&2
    done
}
for row in $ROWS; do
    IFS=- read -r w dtype rest <<< "$row"
    gc=""; q=none
    for part in ${rest//-/ }; do
        case "$part" in gc) gc=gc ;; int8|nf4|fp4) q=$part ;; esac
    done
    rargs=(bench --workload "$w" --dtype "$dtype" --model "$MODEL" --steps "$STEPS" --json --work "$WORK")
    pargs=("$MODEL" --workload "$w" --dtype "$dtype" --steps "$STEPS")
    if [ "$dtype" = bf16 ] && [ -n "${PT_BF16_STEPS:-}" ]; then
        pargs=("$MODEL" --workload "$w" --dtype "$dtype" --steps "$PT_BF16_STEPS" --warmup 0)
    fi
    if [ "$gc" = gc ]; then rargs+=(--gradient-checkpointing); pargs+=(--gc); fi
    if [ "$q" != none ]; then rargs+=(--quantization "$q"); pargs+=(--quantization "$q"); fi
    for side in $SIDES; do
        if [ "$side" = rlft ]; then cmd=($RLFT "${rargs[@]}"); else cmd=($PY scripts/scale_bench.py "${pargs[@]}"); fi
        quiet
        load=$(cut -d' ' -f1 /proc/loadavg)
        line=$(timeout "$TIMEOUT" "${cmd[@]}" 2>"$WORK/$side.err" | tail -1); rc=$?
        if [ -n "$line" ] && [ "${line:0:1}" = "{" ]; then
            emit "$row" "$load" "$line"
            continue
        fi
        why=$(grep -o 'gradient checkpointing is not available in this build' "$WORK/$side.err" | head -1)
        [ "$rc" = 124 ] && why="timed out after $TIMEOUT s"
        if [ -z "$why" ]; then echo "$side $row failed:" >&2; tail -5 "$WORK/$side.err" >&2; why="failed"; fi
        emit "$row" "$load" "{\"impl\": \"$side\", \"workload\": \"$w\", \"dtype\": \"$dtype\", \"skipped\": \"$why\"}"
    done
done
$PY scripts/scale_table.py "$OUT"
