#!/usr/bin/env python3
"""Peak RSS of `walstream replicate` while it uploads the snapshot of a large database to GCS.

Creates a database of random (incompressible) blobs, starts fake-gcs-server (filesystem
backend, so the emulator's memory is not the question), runs the release binary until the
snapshot object is in the bucket, stops it with SIGTERM, and prints the child's peak RSS as
the kernel reports it (wait4's ru_maxrss).

    scripts/install-tools.sh && scripts/measure-snapshot-upload.py [SIZE_MIB]
"""
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE_MIB = int(sys.argv[1]) if len(sys.argv) > 1 else 1024


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, limit=600):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"timed out waiting for {what}")


def main():
    subprocess.run(["cargo", "build", "--quiet", "--release", "-p", "walstream-cli", "--bin", "walstream"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="walstream-snapshot-")
    db = os.path.join(work, "big.db")
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("CREATE TABLE blobs(id INTEGER PRIMARY KEY, data BLOB)")
    for _ in range(SIZE_MIB):
        conn.execute("INSERT INTO blobs(data) VALUES (randomblob(1024 * 1024 - 200))")
        conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    db_bytes = os.path.getsize(db)

    port = free_port()
    host = f"127.0.0.1:{port}"
    emulator = subprocess.Popen(
        [os.path.join(ROOT, ".tools/fake-gcs-server"), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-public-host", host, "-external-url", f"http://{host}", "-backend", "filesystem",
         "-filesystem-root", os.path.join(work, "gcs"), "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("fake-gcs-server", lambda: urllib.request.urlopen(f"http://{host}/storage/v1/b", timeout=1))
        req = urllib.request.Request(f"http://{host}/storage/v1/b", data=b'{"name":"bench"}', headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req)

        def snapshot_size():
            with urllib.request.urlopen(f"http://{host}/storage/v1/b/bench/o?prefix=db/") as r:
                items = json.load(r).get("items", [])
            sizes = [int(o["size"]) for o in items if o["name"].endswith(".snapshot.lz4")]
            return sizes[0] if sizes else None

        env = dict(os.environ, STORAGE_EMULATOR_HOST=host, WALSTREAM_LOG="warn")
        started = time.time()
        replicator = subprocess.Popen([os.path.join(ROOT, "target/release/walstream"), "replicate", db, "gcs://bench/db"], env=env)
        wait_for("the snapshot object", lambda: snapshot_size() is not None)
        uploaded = time.time() - started
        replicator.send_signal(signal.SIGTERM)
        # wait4 gives this one child's rusage (not cargo's, which RUSAGE_CHILDREN would include).
        _, status, usage = os.wait4(replicator.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        peak_kib = usage.ru_maxrss
        print(f"database: {db_bytes / 2**20:.0f} MiB; snapshot object: {snapshot_size() / 2**20:.0f} MiB; "
              f"replicate start -> snapshot in bucket: {uploaded:.1f} s; exit {code}; "
              f"walstream peak RSS: {peak_kib / 1024:.1f} MiB")
    finally:
        emulator.terminate()
        emulator.wait()
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
