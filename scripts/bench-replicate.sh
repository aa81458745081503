#!/usr/bin/env bash
# Replication, walstream vs litestream v0.3.13 on the same workloads and the same
# fake-gcs-server (docs/benchmarks.md). Prints a markdown table; writes the chart.
# walstream is the binary the container image holds (scripts/build-release.sh).
#   scripts/bench-replicate.sh [--idle-secs 60] [--transactions 300000] [--saturated-runs 3] [--dbs 100] ...
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-tools.sh
scripts/build-release.sh
cargo build --release --locked --bin walstream-bench
exec target/release/walstream-bench replicate --walstream target/dist/walstream \
  --litestream .tools/litestream/litestream --fake-gcs-server .tools/fake-gcs-server \
  --chart docs/benchmarks-replicate.svg "$@"
