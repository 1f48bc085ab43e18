#!/usr/bin/env bash
# The GPU suite in two halves, because the GPU machine has no Rust toolchain.
#
#   scripts/gpu-check.sh bundle
#       Here, with cargo and the pinned nvcc: builds every test and bench
#       executable and the CLI with the kernels compiled, strips them, and
#       packs them with scripts/ (this script, torch_baselines.py and
#       baselines/, the PEFT scripts) into gpu-bundle/gpu-bundle.tar.xz
#       (git-ignored, must stay under 64 MiB).
#
#   scripts/gpu-check.sh MODE [OUTDIR]      on the GPU machine, repo root
#       MODE is one of
#         run       everything, in order of importance (below)
#         quick     GPU tests and the benches' GPU parts, for iterating
#         sanitize  compute-sanitizer memcheck and racecheck over every GPU
#                   test, with LORAFUSE_PROPTEST_CASES=2 and
#                   LORAFUSE_TEST_SMALL=1 (one shape per tile boundary)
#       Stages of `run`: A device info, B selfcheck, C GPU tests, D demo on
#       the GPU, E torch_baselines.py, F the benches' GPU parts (reading E's
#       JSON through LORAFUSE_TORCH_BASELINES), G PyTorch+PEFT speed and the
#       trainer comparison with PEFT, H sanitizers as in `sanitize`, I ncu of
#       NCU_KERNELS (a regex; stage skipped when unset).
#
# A GPU is lent for ~15 minutes in all, start-up included, at most 10 per
# call: every stage runs under `timeout`, capped by what is left of BUDGET_S
# (default 540 s) and skipped when under 10 s are left, so one call returns
# whatever finished. Each stage writes OUTDIR/<stage>.log as soon as it ends
# and one line to OUTDIR/summary.txt (printed as it goes). Only the GPU parts
# of the benches run: `--bench no-cpu-part` is a criterion filter that
# matches none of their CPU groups.
#
# Environment: BUDGET_S (total seconds), BATCH (training benches' batch,
# lorafuse's and PEFT's alike; default 8), NCU_KERNELS, BUNDLE (default
# gpu-bundle/gpu-bundle.tar.xz). Results belong in BENCHMARKS.md (device,
# driver, date, commit) with the logs under docs/gpu-runs/<date>-<gpu>-<commit>/.
set -uo pipefail
cd "$(dirname "$0")/.."

bundle() {
    set -e
    local nvcc
    nvcc=$(scripts/install-cuda-toolchain.sh | tail -1)
    export NVCC="$nvcc"
    # No debug info: the bundle must travel in under 64 MiB.
    export CARGO_PROFILE_DEV_DEBUG=false CARGO_PROFILE_BENCH_DEBUG=false CARGO_PROFILE_RELEASE_DEBUG=false
    rm -rf gpu-bundle && mkdir -p gpu-bundle/tests gpu-bundle/benches
    cargo test --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        kind = m["target"]["kind"][0]
        name = m["target"]["name"] if kind == "test" else kind + "-" + m["target"]["name"]
        print(name, m["executable"])' |
        while read -r name exe; do cp "$exe" "gpu-bundle/tests/$name"; done
    cargo bench --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])' |
        while read -r name exe; do cp "$exe" "gpu-bundle/benches/$name"; done
    cargo build --release --bin lorafuse
    cp target/release/lorafuse gpu-bundle/
    strip gpu-bundle/tests/* gpu-bundle/benches/* gpu-bundle/lorafuse
    # The scripts travel too: the GPU machine may have no checkout.
    mkdir -p gpu-bundle/scripts
    cp -r scripts/*.sh scripts/*.py scripts/baselines gpu-bundle/scripts/
    rm -rf gpu-bundle/scripts/baselines/__pycache__
    git rev-parse HEAD > gpu-bundle/COMMIT 2>/dev/null || echo unknown > gpu-bundle/COMMIT
    tar -C gpu-bundle -cJf gpu-bundle.tar.xz . && rm -rf gpu-bundle/* && mv gpu-bundle.tar.xz gpu-bundle/
    ls -la gpu-bundle/
    local size
    size=$(stat -c %s gpu-bundle/gpu-bundle.tar.xz)
    if [ "$size" -gt $((64 * 1024 * 1024)) ]; then
        echo "gpu-bundle.tar.xz is $((size / 1048576)) MiB: over the 64 MiB a device call carries" >&2
        exit 1
    fi
}

# ---- the GPU side ------------------------------------------------------------

T0=$(date +%s)
STAGE_RC=skipped
elapsed() { echo "$(($(date +%s) - T0))s"; }
# cap N: N seconds, or what is left of BUDGET_S when that is less.
cap() {
    local left=$((${BUDGET_S:-540} - ($(date +%s) - T0)))
    if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
# stage NAME SECONDS CMD...: runs CMD under timeout into OUT/NAME.log (CMD's
# own redirections aside) and records rc and elapsed time; skipped when fewer
# than 10 s of the budget are left.
stage() {
    local name=$1 want=$2 limit
    shift 2
    limit=$(cap "$want")
    if [ "$limit" -lt 10 ]; then
        say "$name: skipped, budget spent ($(elapsed))"
        return 0
    fi
    timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    [ $rc -eq 124 ] && echo "(timed out after ${limit}s)" >> "$OUT/$name.log"
    STAGE_RC=$rc
    return 0
}

unpack() {
    local bundle=${BUNDLE:-gpu-bundle/gpu-bundle.tar.xz}
    B=/tmp/lorafuse-gpu-bundle
    rm -rf "$B" && mkdir -p "$B"
    tar -C "$B" -xJf "$bundle" || { echo "no bundle at $bundle: run 'scripts/gpu-check.sh bundle' first" >&2; exit 1; }
    # Prefer the checkout's scripts when there is one, else the bundle's.
    SCRIPTS=scripts
    [ -f scripts/torch_baselines.py ] || SCRIPTS="$B/scripts"
    GPU_TESTS=()
    for t in "$B"/tests/*; do
        # GPU tests are the ones whose name contains gpu_ (integration tests
        # start with it; unit tests in the library sit under a module path).
        "$t" --list 2>/dev/null | grep -q 'gpu_.*: test$' && GPU_TESTS+=("$t")
    done
}

device_info() {
    echo "commit $(cat "$B/COMMIT")"
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    nvidia-smi -q | grep -E 'CUDA Version|MIG Mode' -A1 | head -6
    "$B/lorafuse" info
}

gpu_tests() {
    # All binaries at once (one GPU, separate processes), each bounded.
    local limit t n
    limit=$(cap 180)
    [ "$limit" -lt 10 ] && { say "C tests: skipped, budget spent"; return; }
    mkdir -p "$OUT/C-tests"
    for t in "${GPU_TESTS[@]}"; do
        n=$(basename "$t")
        (timeout -k 5 "$limit" "$t" gpu_ --test-threads=1 > "$OUT/C-tests/$n.log" 2>&1; echo "rc=$?" >> "$OUT/C-tests/$n.log") &
    done
    wait
    for t in "${GPU_TESTS[@]}"; do
        n=$(basename "$t")
        say "C test $n $(tail -1 "$OUT/C-tests/$n.log") $(grep -E '^test result' "$OUT/C-tests/$n.log" | tail -1 | cut -d';' -f1-3) skipped=$(grep -c 'skipped:' "$OUT/C-tests/$n.log")"
    done
    say "C tests done ($(elapsed))"
}

benches() {
    local batch=${BATCH:-8} bn
    export LORAFUSE_TORCH_BASELINES="$OUT/E-torch-baselines.json"
    [ -f "$LORAFUSE_TORCH_BASELINES" ] || unset LORAFUSE_TORCH_BASELINES
    for bn in lowrank projection adapter_sum multi_adapter attention; do
        [ -x "$B/benches/$bn" ] || continue
        STAGE_RC=skipped
        stage "F-bench-$bn" 100 "$B/benches/$bn" --bench no-cpu-part
        say "F bench $bn rc=$STAGE_RC ($(elapsed)) $(grep -c 'skipped' "$OUT/F-bench-$bn.log" 2>/dev/null) skipped lines"
    done
    if [ -x "$B/benches/train" ]; then
        STAGE_RC=skipped
        LORAFUSE_BENCH_BATCH="$batch" LORAFUSE_BENCH_WARMUP=3 LORAFUSE_BENCH_STEPS=10 \
            stage F-bench-train 150 "$B/benches/train" --bench no-cpu-part
        say "F bench train rc=$STAGE_RC ($(elapsed))"
    fi
}

sanitizers() {
    # Few property cases and small shapes: racecheck runs kernels ~100× slower.
    export LORAFUSE_PROPTEST_CASES=${LORAFUSE_PROPTEST_CASES:-2} LORAFUSE_TEST_SMALL=1
    if ! command -v compute-sanitizer > /dev/null; then
        say "H sanitizers: compute-sanitizer not found"
        return
    fi
    local tool t n
    for tool in memcheck racecheck; do
        for t in "${GPU_TESTS[@]}"; do
            n=$(basename "$t")
            STAGE_RC=skipped
            stage "H-$tool-$n" 120 compute-sanitizer --tool "$tool" --error-exitcode 99 "$t" gpu_ --test-threads=1
            say "H $tool $n rc=$STAGE_RC $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/H-$tool-$n.log" 2>/dev/null | tail -1 | sed 's/=* *//') $(grep -E '^test result' "$OUT/H-$tool-$n.log" 2>/dev/null | cut -d';' -f1-2) ($(elapsed))"
        done
    done
    unset LORAFUSE_PROPTEST_CASES LORAFUSE_TEST_SMALL
}

has_torch() { python3 -c "import torch; assert torch.cuda.is_available()" > /dev/null 2>&1; }
has_peft() { python3 -c "import torch, transformers, peft" > /dev/null 2>&1; }

torch_stages() {
    if ! has_peft; then
        say "G PyTorch+PEFT: skipped (python3 cannot import torch, transformers and peft)"
        return
    fi
    local batch=${BATCH:-8}
    STAGE_RC=skipped
    stage G-peft-compare-f32 120 python3 "$SCRIPTS/peft_compare.py" --lorafuse "$B/lorafuse" \
        --lorafuse-device cuda --lorafuse-precision f32 --out /tmp/lorafuse-cmp-f32
    say "G peft_compare cuda f32 rc=$STAGE_RC $(tail -1 "$OUT/G-peft-compare-f32.log" 2>/dev/null) ($(elapsed))"
    STAGE_RC=skipped
    stage G-peft-compare-bf16 80 python3 "$SCRIPTS/peft_compare.py" --lorafuse "$B/lorafuse" \
        --lorafuse-device cuda --lorafuse-precision bf16 --kinds lora --out /tmp/lorafuse-cmp-bf16
    say "G peft_compare cuda bf16 lora rc=$STAGE_RC $(tail -1 "$OUT/G-peft-compare-bf16.log" 2>/dev/null) ($(elapsed))"
    STAGE_RC=skipped
    PYTHONUNBUFFERED=1 stage G-peft-speed 200 python3 "$SCRIPTS/peft_speed.py" --batch "$batch" --kinds lora \
        --warmup 3 --steps 10
    say "G peft_speed lora rc=$STAGE_RC ($(elapsed))"
}

run_mode() {
    local mode=$1
    OUT=${2:-gpu-report}
    mkdir -p "$OUT"
    : > "$OUT/summary.txt"
    unpack
    say "gpu-check $mode: commit $(cat "$B/COMMIT"), budget ${BUDGET_S:-540}s, ${#GPU_TESTS[@]} test binaries with GPU tests"
    device_info > "$OUT/A-device.log" 2>&1
    say "A $(sed -n 3p "$OUT/A-device.log")"
    case "$mode" in
        sanitize)
            sanitizers
            ;;
        quick)
            gpu_tests
            benches
            ;;
        run)
            STAGE_RC=skipped
            stage B-selfcheck 90 "$B/lorafuse" selfcheck
            say "B selfcheck rc=$STAGE_RC ($(elapsed))"
            gpu_tests
            STAGE_RC=skipped
            stage D-demo 120 "$B/lorafuse" demo --device cuda --out /tmp/lorafuse-demo
            say "D demo --device cuda rc=$STAGE_RC $(grep -iE 'total' "$OUT/D-demo.log" 2>/dev/null | tail -1) ($(elapsed))"
            if has_torch; then
                STAGE_RC=skipped
                stage E-torch-baselines 150 python3 "$SCRIPTS/torch_baselines.py" --out "$OUT/E-torch-baselines.json"
                say "E torch_baselines rc=$STAGE_RC $(grep -c '"key"' "$OUT/E-torch-baselines.log" 2>/dev/null) rows ($(elapsed))"
            else
                say "E torch_baselines: skipped (no torch with CUDA)"
            fi
            benches
            torch_stages
            sanitizers
            if [ -n "${NCU_KERNELS:-}" ] && command -v ncu > /dev/null; then
                STAGE_RC=skipped
                LORAFUSE_BENCH_METHODS=lora LORAFUSE_BENCH_WARMUP=1 LORAFUSE_BENCH_STEPS=1 LORAFUSE_BENCH_BATCH=${BATCH:-8} \
                    stage I-ncu 120 ncu --target-processes all -k "regex:$NCU_KERNELS" --launch-count 12 \
                    --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
                    "$B/benches/train" --bench no-cpu-part
                gzip -f "$OUT/I-ncu.log"
                say "I ncu '$NCU_KERNELS' rc=$STAGE_RC ($(elapsed))"
            fi
            ;;
    esac
    say "gpu-check $mode done ($(elapsed)); logs in $OUT"
}

case "${1:-}" in
    bundle) bundle ;;
    run | quick | sanitize) run_mode "$@" ;;
    *)
        echo "usage: $0 bundle | run [OUTDIR] | quick [OUTDIR] | sanitize [OUTDIR]" >&2
        exit 2
        ;;
esac
