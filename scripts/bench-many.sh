#!/usr/bin/env bash
# Many databases in one replicator process: descriptors, threads, RSS, CPU and commit lag per
# database count, walstream and litestream v0.3.13 (docs/benchmarks.md). Runs as root: the
# replicator's descriptor limit is raised for it.
#   scripts/bench-many.sh [--dbs 1,1000,10000] [--litestream-max 1000] [--commit-secs 20]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-tools.sh
scripts/build-release.sh
cargo build --release --locked --bin walstream-bench
exec target/release/walstream-bench many --walstream target/dist/walstream \
  --litestream .tools/litestream/litestream "$@"
