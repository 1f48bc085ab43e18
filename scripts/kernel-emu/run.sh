#!/usr/bin/env bash
# Builds and runs the CPU emulation of CUDA kernel families (see emu.h): each
# family's harness (<family>.cpp) includes kernels/<family>.cu and checks its
# kernels against an f64 reference. Exits non-zero if any check fails.
# Usage: scripts/kernel-emu/run.sh [attention|nn|projection|adapter_sum|multi_adapter|all] [all|f32|f16|bf16]
# EMU_CXXFLAGS adds compiler flags, e.g. EMU_CXXFLAGS="-fsanitize=address,undefined"
# to catch out-of-bounds reads and writes in the kernels (slower).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/../../target/kernel-emu"
which="${1:-all}"
dtype="${2:-all}"
case "$which" in
    all) families=(attention nn projection adapter_sum multi_adapter) ;;
    attention | nn | projection | adapter_sum | multi_adapter) families=("$which") ;;
    *) echo "usage: $0 [attention|nn|projection|adapter_sum|multi_adapter|all] [all|f32|f16|bf16]" >&2; exit 2 ;;
esac
case "$dtype" in
    all | f32 | f16 | bf16) ;;
    *) echo "usage: $0 [attention|nn|projection|adapter_sum|multi_adapter|all] [all|f32|f16|bf16]" >&2; exit 2 ;;
esac
mkdir -p "$out"
status=0
for family in "${families[@]}"; do
    g++ -std=c++20 -O2 -pthread -Wall -Wno-unknown-pragmas -I"$here/stub" -I"$here" -I"$here/../../kernels" \
        ${EMU_CXXFLAGS:-} -o "$out/$family" "$here/$family.cpp"
    echo "==== $family ($dtype)"
    start=$SECONDS
    "$out/$family" "$dtype" || status=1
    echo "==== $family: $((SECONDS - start)) s"
done
exit $status
