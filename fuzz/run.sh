#!/usr/bin/env bash
# Runs every fuzz target for a bounded time when a nightly toolchain and cargo-fuzz are
# installed (CI can call this; it says so and exits 0 when they are not).
#   fuzz/run.sh [SECONDS_PER_TARGET]      default 60
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
if ! cargo +nightly --version >/dev/null 2>&1 || ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz/run.sh: no nightly toolchain or cargo-fuzz (rustup toolchain install nightly && cargo install cargo-fuzz); the stable test smtp::fuzzing::tests ran the same checks"
    exit 0
fi
for t in smtp_command data_state_machine; do
    echo "== fuzzing $t for ${secs}s"
    cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -dict=smtp.dict
done
