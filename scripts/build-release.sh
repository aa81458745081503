#!/usr/bin/env bash
# Builds the walstream binary exactly as docker/Dockerfile does: release profile, no debug info,
# symbols stripped, from the locked dependencies. Output: target/dist/walstream.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols \
  cargo build --release --locked -p walstream-cli --bin walstream --target-dir target/dist-build
mkdir -p target/dist
cp target/dist-build/release/walstream target/dist/walstream
echo "build-release: target/dist/walstream ($(du -h target/dist/walstream | cut -f1))"
