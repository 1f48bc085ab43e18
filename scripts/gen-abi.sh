#!/usr/bin/env bash
# Regenerates src/abi/bindings.rs, the Rust side of kernels/abi.h, with
# bindgen (build.rs, `regen-abi` feature). Run it after changing abi.h and
# commit both files. With --check it changes nothing and fails if the
# committed file is stale (CI runs that).
#
# bindgen needs libclang; without LIBCLANG_PATH this installs libclang 18
# from PyPI into .libclang (scripts/install-libclang.sh).
#
# Usage: scripts/gen-abi.sh [--check]
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    --check) bless=0 ;;
    "") bless=1 ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac
if [ -z "${LIBCLANG_PATH:-}" ]; then
    LIBCLANG_PATH="$(scripts/install-libclang.sh | tail -n 1)"
    export LIBCLANG_PATH
fi
# The kernels play no part in the bindings: skip nvcc.
RUST_BACKTRACE=0 LORAFUSE_SKIP_KERNELS=1 LORAFUSE_ABI_BLESS=$bless cargo build --quiet --lib --features regen-abi
if [ "$bless" = 0 ]; then
    echo "gen-abi: src/abi/bindings.rs matches kernels/abi.h"
fi
