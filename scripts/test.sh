#!/usr/bin/env bash
# The whole test suite: installs the peers the tests need, then lint + every test, then a
# bounded fuzzing run where the toolchain allows it (cargo-fuzz needs nightly; without it the
# script says so, and the stable tests smtp::fuzzing::* have already run the same checks over
# 100k generated inputs each).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
bash fuzz/run.sh "${FUZZ_SECONDS:-30}"
