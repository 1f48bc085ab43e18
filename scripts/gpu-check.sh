#!/usr/bin/env bash
# The GPU suite in two halves, because the GPU machine has no Rust toolchain.
#
#   scripts/gpu-check.sh bundle   (here, with cargo and the pinned nvcc)
#       Builds every test and bench executable with the kernels compiled,
#       strips them, and packs them with this script into gpu-bundle/
#       (git-ignored; carry it to the GPU machine).
#
#   scripts/gpu-check.sh run [OUTDIR]   (on the GPU machine, in the repo root)
#       Unpacks the bundle, prints the device, runs every test executable
#       (GPU tests included), compute-sanitizer memcheck and racecheck over
#       the GPU tests, then the benches, then (when python3 has torch,
#       transformers and peft) scripts/peft_speed.py, train_speed_table.py
#       and peft_compare.py; logs go to OUTDIR (default gpu-report/) and a
#       summary table is printed last. BATCH (default 8) is the training
#       benchmarks' batch, lorafuse's and PEFT's alike.
#
# Results belong in BENCHMARKS.md (device, driver, date, commit) with the raw
# logs under docs/gpu-runs/.
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
    git rev-parse HEAD > gpu-bundle/COMMIT 2>/dev/null || echo unknown > gpu-bundle/COMMIT
    tar -C gpu-bundle -cJf gpu-bundle.tar.xz . && rm -rf gpu-bundle/* && mv gpu-bundle.tar.xz gpu-bundle/
    ls -la gpu-bundle/
}

run() {
    local out="${1:-gpu-report}"
    mkdir -p "$out" /tmp/gpu-bundle
    tar -C /tmp/gpu-bundle -xJf gpu-bundle/gpu-bundle.tar.xz || { echo "no bundle: run 'scripts/gpu-check.sh bundle' first"; exit 1; }
    local b=/tmp/gpu-bundle summary="$out/summary.txt"
    : > "$summary"
    {
        echo "commit: $(cat $b/COMMIT)"
        echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
        "$b/lorafuse" info
    } 2>&1 | tee "$out/device.txt"
    "$b/lorafuse" selfcheck 2>&1 | tee "$out/selfcheck.txt"
    echo "selfcheck rc=${PIPESTATUS[0]}" >> "$summary"

    for t in "$b"/tests/*; do
        name=$(basename "$t")
        "$t" --test-threads=1 > "$out/test-$name.txt" 2>&1
        rc=$?
        echo "test $name rc=$rc $(grep -E '^test result' "$out/test-$name.txt" | tail -1) skipped=$(grep -c 'skipped:' "$out/test-$name.txt")" >> "$summary"
    done
    if command -v compute-sanitizer > /dev/null; then
        for tool in memcheck racecheck; do
            for t in "$b"/tests/*; do
                name=$(basename "$t")
                # GPU tests are the ones whose names start with gpu_.
                "$t" --list 2>/dev/null | grep -q '^gpu_' || continue
                compute-sanitizer --tool "$tool" --error-exitcode 99 "$t" gpu_ --test-threads=1 \
                    > "$out/sanitizer-$tool-$name.txt" 2>&1
                echo "$tool $name rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer-$tool-$name.txt" | tail -1)" >> "$summary"
            done
        done
    else
        echo "compute-sanitizer not found: sanitizer runs skipped" >> "$summary"
    fi
    # benches/train.rs and peft_speed.py use the same batch (BATCH, default 8).
    local batch="${BATCH:-8}"
    for bench in "$b"/benches/*; do
        name=$(basename "$bench")
        LORAFUSE_BENCH_BATCH="$batch" "$bench" --bench > "$out/bench-$name.txt" 2>&1
        echo "bench $name rc=$?" >> "$summary"
    done
    # Per-kernel breakdown of the trainer (LoRA, a few steps), when Nsight
    # Systems is installed; the criterion filter matches no CPU bench.
    if command -v nsys > /dev/null; then
        LORAFUSE_BENCH_BATCH="$batch" LORAFUSE_BENCH_METHODS=lora LORAFUSE_BENCH_WARMUP=1 LORAFUSE_BENCH_STEPS=3 \
            nsys profile --stats=true --force-overwrite true -o "$out/nsys-train-lora" \
            "$b/benches/train" --bench no-cpu-part > "$out/nsys-train-lora.txt" 2>&1
        echo "nsys train (lora) rc=$? (per-kernel times in nsys-train-lora.txt)" >> "$summary"
    else
        echo "nsys not found: no per-kernel breakdown of the trainer" >> "$summary"
    fi
    # PyTorch + PEFT: the speed baseline, then the numerical comparison of
    # the trainers (lorafuse on the GPU and, as the oracle, on the CPU).
    if python3 -c "import torch, transformers, peft" > /dev/null 2>&1; then
        python3 scripts/peft_speed.py --batch "$batch" > "$out/peft_speed.jsonl" 2> "$out/peft_speed.err"
        echo "peft_speed rc=$? (stderr in peft_speed.err)" >> "$summary"
        python3 scripts/train_speed_table.py "$out/bench-train.txt" "$out/peft_speed.jsonl" > "$out/train_speed.txt" 2>&1
        # f32 on both devices (the agreement check), then bf16 mixed
        # precision on the GPU (how far it drifts from torch's f32).
        for run in cuda:f32 cpu:f32 cuda:bf16; do
            dev=${run%%:*} prec=${run##*:} tag=${run/:/-}
            python3 scripts/peft_compare.py --lorafuse "$b/lorafuse" --lorafuse-device "$dev" \
                --lorafuse-precision "$prec" --out "$out/peft-compare-$tag" > "$out/peft_compare-$tag.txt" 2>&1
            echo "peft_compare lorafuse-on-$tag rc=$? $(tail -1 "$out/peft_compare-$tag.txt")" >> "$summary"
        done
    else
        echo "peft_speed, peft_compare: skipped (python3 cannot import torch, transformers and peft)" >> "$summary"
    fi
    echo "==== summary"
    cat "$summary"
    for f in "$out"/bench-*.txt; do echo "==== $f"; grep -E ' x ?[0-9]|GB/s|skipped|tokens_per_s|^(forward|fwd\+bwd|  decode)' "$f" | head -120; done
    for f in "$out"/train_speed.txt "$out"/peft_compare-*.txt; do
        [ -f "$f" ] && { echo "==== $f"; grep -vE '^\$ ' "$f" | tail -60; }
    done
}

case "${1:-}" in
    bundle) bundle ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 bundle | run [OUTDIR]" >&2; exit 2 ;;
esac
