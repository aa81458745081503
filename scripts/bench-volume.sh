#!/usr/bin/env bash
# The app's memory volume and WAL with no replicator, under litestream v0.3.13 and under
# walstream, at several write rates, each run on a fresh tmpfs (docs/benchmarks.md). Run as
# root: it mounts the tmpfs. walstream is the binary the container image holds.
#   scripts/bench-volume.sh [--secs 10] [--rates 1,100,1000,0]   (0: flat out)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-tools.sh
scripts/build-release.sh
cargo build --release --locked --bin walstream-bench
exec target/release/walstream-bench volume --walstream target/dist/walstream \
  --litestream .tools/litestream/litestream --fake-gcs-server .tools/fake-gcs-server "$@"
