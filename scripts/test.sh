#!/usr/bin/env bash
# The whole test suite: installs the peers the tests need, then lint + every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
