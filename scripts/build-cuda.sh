#!/usr/bin/env bash
# Builds a CUDA-enabled rlft on a machine without CUDA or a GPU (see docs/gpu.md):
# nvcc from PyPI, candle-core switched to dlopen-ing the CUDA libraries at run time.
# usage: scripts/build-cuda.sh [SCRATCH]   (default scratch: /tmp/rlft-cuda13)
# Output: target/cuda/release/rlft
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA13="${1:-/tmp/rlft-cuda13}"
CUDA13="$(mkdir -p "$CUDA13" && cd "$CUDA13" && pwd)"

if [ ! -x "$CUDA13/bin/pip" ]; then
    python3 -m venv "$CUDA13"
fi
# nvcc 13.0.x: PTX from a newer nvcc is too new for the driver's JIT.
"$CUDA13/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-nvvm==13.0.88

export CUDA_ROOT="$CUDA13/lib/python3.11/site-packages/nvidia/cu13"
export CUDA_PATH="$CUDA_ROOT" CUDA_HOME="$CUDA_ROOT" PATH="$CUDA_ROOT/bin:$PATH"
export NVCC_CCBIN=/usr/bin/gcc CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION=13000
export NVCC_APPEND_FLAGS="--compress-mode=size"
mkdir -p "$CUDA13/link"
ln -sf "$CUDA_ROOT/lib/libcudart_static.a" "$CUDA13/link/libcudart.a"

# candle-core 0.11 links the CUDA libraries at build time; patch a scratch copy to dlopen them.
cargo fetch -q
CANDLE_SRC="$(ls -d "$HOME"/.cargo/registry/src/*/candle-core-0.11.1 | head -n 1)"
rm -rf "$CUDA13/candle-core-dl"
cp -r "$CANDLE_SRC" "$CUDA13/candle-core-dl"
sed -i 's/"dynamic-linking"/"dynamic-loading"/' "$CUDA13/candle-core-dl/Cargo.toml"

# The patch rewrites Cargo.lock; keep the committed one.
cp Cargo.lock "$CUDA13/Cargo.lock.keep"
trap 'cp "$CUDA13/Cargo.lock.keep" Cargo.lock' EXIT
# RLFT_CUDA_FEATURES: e.g. "cuda,nccl" for data parallelism on GPUs (needs Open MPI's
# libopenmpi-dev and libclang-dev, docs/distributed.md).
RUSTFLAGS="-L$CUDA13/link" CARGO_TARGET_DIR=target/cuda cargo build --release --features "${RLFT_CUDA_FEATURES:-cuda}" \
    --config "patch.crates-io.candle-core.path=\"$CUDA13/candle-core-dl\""
strip target/cuda/release/rlft
ls -la target/cuda/release/rlft
