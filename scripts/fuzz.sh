#!/usr/bin/env bash
# Bounded fuzzing of the JSONL and config parsers (cargo-fuzz, libFuzzer; needs a nightly
# toolchain). usage: scripts/fuzz.sh [SECONDS per target, default 60]
# The corpus grows in fuzz/corpus/<target> (git-ignored) from the seeds in fuzz/seeds/.
# A crash is saved under fuzz/artifacts/<target>/: add it to the regression tests
# (tests/fuzz_regressions.rs) before fixing it.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECS="${1:-60}"
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: no nightly toolchain (rustup toolchain install nightly); skipped" >&2
    exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
for t in jsonl config; do
    mkdir -p "corpus/$t"
    # -s none: the parsers are safe Rust; no sanitizer keeps the build and the runs fast.
    cargo +nightly fuzz run -s none "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$SECS" -max_len=4096 2>&1 | tee "/tmp/rlft-fuzz-$t.log" | grep -E "^(Done|==|INFO: seed)|panicked|SUMMARY" || true
    if ! grep -q "^Done" "/tmp/rlft-fuzz-$t.log"; then
        echo "fuzz target $t failed; see /tmp/rlft-fuzz-$t.log and fuzz/artifacts/$t/" >&2
        exit 1
    fi
done
