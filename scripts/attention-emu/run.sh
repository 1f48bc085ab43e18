#!/usr/bin/env bash
# Builds and runs the CPU emulation of kernels/attention.cu (see main.cpp).
# Usage: scripts/attention-emu/run.sh [all|f32|f16|bf16]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/../../target/attention-emu"
mkdir -p "$out"
g++ -std=c++20 -O2 -pthread -Wall -Wno-unknown-pragmas -I"$here/stub" -I"$here" -I"$here/../../kernels" \
    -o "$out/attention-emu" "$here/main.cpp"
exec "$out/attention-emu" "${1:-all}"
