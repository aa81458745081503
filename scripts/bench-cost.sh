#!/usr/bin/env bash
# Object-store requests and lag at steady write rates, walstream (defaults and
# -sync-interval 100ms) vs litestream v0.3.13 on fake-gcs-server and on moto (docs/benchmarks.md).
# Prints a markdown table. walstream is the binary the container image holds.
#   scripts/bench-cost.sh [--rates 0.1,1,10,100,1000] [--secs 60] [--backends gcs,s3]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-tools.sh
scripts/build-release.sh
cargo build --release --locked --bin walstream-bench
exec target/release/walstream-bench cost --walstream target/dist/walstream \
  --litestream .tools/litestream/litestream --fake-gcs-server .tools/fake-gcs-server --moto-server .tools/venv/bin/moto_server "$@"
