#!/usr/bin/env bash
# What an engine gets with `lorafuse = { default-features = false }`: no CLI
# and no CUDA dependencies in its tree, a library that builds and lints
# clean, and tests that pass (the CPU backend and the trainer; GPU tests and
# CLI tests compile out).
#
#   scripts/check-features.sh          tree, clippy and tests
#   scripts/check-features.sh --tree   the dependency-tree check only (seconds)
set -euo pipefail
cd "$(dirname "$0")/.."

# Crates the library must not pull in without its default features.
forbidden='clap|clap_builder|clap_derive|indicatif|toml|cudarc'

tree=$(cargo tree --no-default-features -e normal --prefix none --format '{p}')
bad=$(grep -E "^($forbidden) " <<<"$tree" | cut -d" " -f1,2 | sort -u || true)
if [[ -n "$bad" ]]; then
    echo "check-features: FAILED: \`cargo tree --no-default-features -e normal\` contains:" >&2
    sed 's/^/    /' <<<"$bad" >&2
    echo "Make the dependency optional and gate it under the \`cli\` or \`cuda\` feature (Cargo.toml [features])." >&2
    exit 1
fi
echo "check-features: no ${forbidden//|/, } in the tree without default features"
[[ "${1:-}" == "--tree" ]] && exit 0

env -u NVCC -u CUDA_HOME -u CUDA_PATH cargo clippy --no-default-features --all-targets -- -D warnings
env -u NVCC -u CUDA_HOME -u CUDA_PATH cargo test --no-default-features
echo "check-features: passed"
