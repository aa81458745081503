#!/usr/bin/env bash
# Restore speed, walstream vs litestream v0.3.13 on the same replica (docs/benchmarks.md).
#   scripts/bench-restore.sh [--db-mib 75] [--transactions 350000] [--runs 3]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-tools.sh
cargo build --release --locked --bin walstream --bin walstream-bench
exec target/release/walstream-bench restore --walstream target/release/walstream --litestream .tools/litestream/litestream "$@"
