#!/usr/bin/env bash
# Installs libclang 18 from PyPI into a local folder, so bindgen can
# regenerate the Rust side of kernels/abi.h (scripts/gen-abi.sh, the
# `regen-abi` feature) on a machine with no system clang: the same approach as
# scripts/install-cuda-toolchain.sh takes for nvcc.
#
# Only maintainers who change kernels/abi.h and CI need this: a plain build
# uses the committed src/abi/bindings.rs and never loads libclang.
#
# Usage: scripts/install-libclang.sh [DIR]   (default: .libclang)
# Prints the folder holding libclang.so on its last line; export
# LIBCLANG_PATH=<that folder> for bindgen.
set -euo pipefail

dir="${1:-$(cd "$(dirname "$0")/.." && pwd)/.libclang}"
lib="$dir/clang/native"

if [ -f "$lib/libclang.so" ] && grep -qs "^Version: 18.1.1$" "$dir"/libclang-18.1.1.dist-info/METADATA; then
    echo "libclang 18.1.1 already installed" >&2
    echo "$lib"
    exit 0
fi

python="${PYTHON:-python3}"
"$python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$dir" libclang==18.1.1 >&2
if [ ! -f "$lib/libclang.so" ]; then
    echo "install-libclang: the wheel has no $lib/libclang.so (not an x86_64/aarch64 Linux wheel?)" >&2
    exit 1
fi
echo "$lib"
