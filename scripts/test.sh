#!/usr/bin/env bash
# The one command that sets up and runs the whole suite (README, .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-tools.sh
# Build every binary once (the e2e tests run target/debug/walstream), then run all tests.
cargo build --workspace --all-targets --locked
cargo nextest run --workspace --locked --no-fail-fast "$@"
# Doc tests are not run by nextest.
cargo test --workspace --doc --locked
