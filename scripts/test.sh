#!/usr/bin/env bash
# The one command that sets up and runs the whole suite (README, .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-tools.sh
# CI builds once from clean: incremental state would only take disk (about 0.6 GB).
export CARGO_INCREMENTAL=0
# The gates come first: a formatting or lint failure needs no emulator to report.
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# And on any doc link that no longer resolves: moved or renamed items leave them behind.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --document-private-items --locked
echo "test: $(df -h --output=avail . | tail -1 | tr -d ' ') free on $(df --output=target . | tail -1)"
# Build every binary once (the e2e tests run target/debug/walstream), then run all tests.
cargo build --workspace --all-targets --locked
# The binary the container image holds; the deploy tests run it.
scripts/build-release.sh
export WALSTREAM_RELEASE_BIN="$PWD/target/dist/walstream"

# One GCS emulator for the whole run; each test makes its own bucket in it. (Without this the
# tests start one per test process.)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.tools/fake-gcs-server -scheme http -host 127.0.0.1 -port "$port" -public-host "127.0.0.1:$port" \
  -external-url "http://127.0.0.1:$port" -backend memory -log-level error >/dev/null 2>&1 &
emulator=$!
trap 'kill $emulator 2>/dev/null || true' EXIT
python3 - "$port" <<'PY'
import sys, time, urllib.request
for _ in range(200):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/storage/v1/b", timeout=1)
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("fake-gcs-server did not start")
PY
export WALSTREAM_TEST_GCS_HOST="127.0.0.1:$port"

# One S3 server (moto) likewise; each test makes its own bucket in it.
s3_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.tools/venv/bin/moto_server -H 127.0.0.1 -p "$s3_port" >/dev/null 2>&1 &
s3_server=$!
trap 'kill $emulator $s3_server 2>/dev/null || true' EXIT
python3 - "$s3_port" <<'PY'
import sys, time, urllib.request
for _ in range(300):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=1)
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("moto_server did not start")
PY
export WALSTREAM_TEST_S3_HOST="127.0.0.1:$s3_port"

cargo nextest run --workspace --locked --no-fail-fast "$@"
# Doc tests are not run by nextest.
cargo test --workspace --doc --locked
