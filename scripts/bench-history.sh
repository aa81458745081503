#!/usr/bin/env bash
# Restore time as history grows: walstream (default -snapshot-wal-ratio, and 0) vs litestream
# v0.3.13, each replicating its own copy of the database to file:// (docs/benchmarks.md).
#   scripts/bench-history.sh [--db-mib 16] [--rounds 1,10,100]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-tools.sh
scripts/build-release.sh
cargo build --release --locked --bin walstream-bench
exec target/release/walstream-bench history --walstream target/dist/walstream \
  --litestream .tools/litestream/litestream "$@"
