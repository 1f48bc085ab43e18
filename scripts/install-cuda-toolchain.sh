#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, ptxas, the CUDA headers) from
# PyPI wheels into a local folder, so kernels can be compiled and their ptxas
# reports read on a machine with no CUDA toolkit and no GPU (CI does this).
#
# 13.0 matches the driver of the lent GPU machines (580 / CUDA 13.0): PTX from
# a newer nvcc would not load there.
#
# Usage: scripts/install-cuda-toolchain.sh [DIR]   (default: .cuda-toolchain)
# Prints the path of nvcc on its last line; export NVCC=<that path> to build
# the kernels.
set -euo pipefail

dir="${1:-$(cd "$(dirname "$0")/.." && pwd)/.cuda-toolchain}"
nvcc="$dir/nvidia/cu13/bin/nvcc"

if [ -x "$nvcc" ] && "$nvcc" --version 2>/dev/null | grep -q "release 13.0"; then
    echo "pinned nvcc already installed" >&2
    echo "$nvcc"
    exit 0
fi

python="${PYTHON:-python3}"
# One pip call for all wheels: separate installs into one --target skip files
# that an earlier one already placed.
"$python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$dir" \
    nvidia-cuda-nvcc==13.0.88 \
    nvidia-cuda-runtime==13.0.96 \
    nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-cccl==13.0.85 \
    nvidia-nvvm==13.0.88 >&2

# The wheels place nvvm and crt beside bin/, where nvcc's nvcc.profile expects
# them; check that the compiler really runs before reporting success.
"$nvcc" --version >&2
echo "$nvcc"
