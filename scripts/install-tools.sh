#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain into the git-ignored .tools/:
# the real litestream v0.3.13 (the interop peer), from the npm package that ships it.
# Idempotent: a second run with everything in place does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

LITESTREAM_NPM_PACKAGE="@flydotio/litestream-linux-x64@1.0.1"   # ships litestream v0.3.13
LITESTREAM_DIR=.tools/litestream

if [ ! -x "$LITESTREAM_DIR/litestream" ] || ! "$LITESTREAM_DIR/litestream" version 2>/dev/null | grep -q '^v0.3.13$'; then
  echo "install-tools: fetching litestream v0.3.13 ($LITESTREAM_NPM_PACKAGE)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent "$LITESTREAM_NPM_PACKAGE" >/dev/null 2>&1 && tar xzf ./*.tgz)
  mkdir -p "$LITESTREAM_DIR"
  install -m 0755 "$work/package/litestream" "$LITESTREAM_DIR/litestream"
fi
version=$("$LITESTREAM_DIR/litestream" version)
[ "$version" = "v0.3.13" ] || { echo "install-tools: expected litestream v0.3.13, got $version" >&2; exit 1; }
echo "install-tools: litestream $version at $LITESTREAM_DIR/litestream"

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "install-tools: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
