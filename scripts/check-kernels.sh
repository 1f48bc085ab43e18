#!/usr/bin/env bash
# Compiles every kernels/*.cu for each target architecture with the ptxas
# resource report, saves it under target/ptxas/, prints a one-line summary per
# kernel, and fails if any kernel spills to local memory or has a stack frame
# (a run-time-indexed register array, usually: slow, and never intended here).
#
# The nvcc flags are the build's: kernels/nvcc-flags.txt (which build.rs
# reads too) and LORAFUSE_NVCC_FLAGS, with -cubin and one -gencode per
# target instead of the fatbin.
#
# Usage: scripts/check-kernels.sh [NVCC]   (default: $NVCC, then nvcc on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc="${1:-${NVCC:-nvcc}}"
archs="${LORAFUSE_CUDA_ARCHS:-sm_80,sm_90a}"
mapfile -t flags < <(sed -e 's/#.*//' -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' -e '/^$/d' kernels/nvcc-flags.txt)
read -r -a extra <<< "${LORAFUSE_NVCC_FLAGS:-}"
out=target/ptxas
mkdir -p "$out"
status=0
for src in kernels/*.cu; do
    family=$(basename "$src" .cu)
    for arch in ${archs//,/ }; do
        num=${arch#sm_}
        report="$out/$family.$arch.txt"
        "$nvcc" -cubin "${flags[@]}" -Ikernels "-gencode=arch=compute_$num,code=sm_$num" "${extra[@]}" -Xptxas -v \
            -o "$out/$family.$arch.cubin" "$src" 2> "$report"
        # ptxas prints "Function properties for NAME", then the stack/spill
        # line, then "Used N registers, ... smem".
        awk -v fam="$family" -v arch="$arch" '
            /Function properties for/ { name = $NF }
            /bytes stack frame/ { stack = $1; spill_st = $5; spill_ld = $9 }
            /Used [0-9]+ registers/ {
                regs = $5; smem = "0"
                for (i = 1; i <= NF; i++) if ($i ~ /smem/) smem = $(i-2)
                bad = (stack + 0 > 0 || spill_st + 0 > 0 || spill_ld + 0 > 0)
                printf "%-8s %-7s %-44s regs=%-4s smem=%-6s stack=%-4s spills=%s/%s%s\n",
                    fam, arch, name, regs, smem, stack, spill_st, spill_ld, bad ? "  <-- SPILL" : ""
            }' "$report" | tee "$out/$family.$arch.summary"
        if grep -q "SPILL" "$out/$family.$arch.summary"; then status=1; fi
    done
done
if [ "$status" -ne 0 ]; then
    echo "check-kernels: some kernels spill or use a stack frame (see above and $out/)" >&2
else
    echo "check-kernels: every kernel compiled with no spills and no stack frame"
fi
exit $status
