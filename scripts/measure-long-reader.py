#!/usr/bin/env python3
"""Issue 19's long reader, by hand (it writes gigabytes of WAL, too much for CI): a reader holds
one transaction for 10 s while another connection commits 3,000-byte rows flat out
(synchronous=NORMAL, busy_timeout=5000). Prints the writer's worst commit with no replicator,
with walstream on a file:// replica and with walstream on a fake-gcs-server bucket.

    scripts/build-release.sh && scripts/install-tools.sh
    python3 scripts/measure-long-reader.py [--runs 1] [--dir /tmp]
"""
import argparse, os, shutil, socket, sqlite3, subprocess, tempfile, time, urllib.parse, urllib.request, json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WALSTREAM = os.path.join(ROOT, "target", "dist", "walstream")
FAKE_GCS = os.path.join(ROOT, ".tools", "fake-gcs-server")


def write_beside_a_long_reader(db):
    conn = sqlite3.connect(db, isolation_level=None, timeout=5)
    conn.execute("pragma journal_mode=wal")
    conn.execute("pragma synchronous=normal")
    conn.execute("insert into t(b) values (randomblob(3000))")
    reader = sqlite3.connect(db, isolation_level=None, timeout=5)
    reader.execute("begin")
    reader.execute("select count(*) from t").fetchone()
    worst, worst_at, n, start = 0.0, 0.0, 0, time.time()
    while time.time() - start < 10:
        t = time.time()
        conn.execute("insert into t(b) values (randomblob(3000))")
        took = time.time() - t
        if took > worst:
            worst, worst_at = took, t - start
        n += 1
    reader.execute("commit")
    wal = os.path.getsize(db + "-wal")
    # Closed here, not left to Python: its sqlite3 connections sit in a reference cycle (the
    # statement cache), so only the cyclic GC closed them, at some point in the next run. The
    # deleted WAL they held open, gigabytes, was then freed inside one of that run's commits,
    # and on a filesystem mounted with `discard` (this machine's root) ext4 discards the freed
    # blocks synchronously: that commit took 2.7-3.1 s, with no replicator as with one.
    reader.close()
    conn.close()
    return worst, worst_at, n, wal


def empty_bucket(host, bucket):
    """Deletes what a run uploaded: the emulator keeps objects in memory, gigabytes a run."""
    base = f"http://{host}/storage/v1/b/{bucket}/o"
    while True:
        listing = json.load(urllib.request.urlopen(base))
        names = [o["name"] for o in listing.get("items", [])]
        if not names:
            return
        for name in names:
            urllib.request.urlopen(urllib.request.Request(f"{base}/{urllib.parse.quote(name, safe='')}", method="DELETE")).read()


def one_run(base, mode, host, bucket):
    # The run before left gigabytes to write back: each run starts from a clean page cache.
    os.sync()
    d = tempfile.mkdtemp(dir=base)
    db = os.path.join(d, "db")
    conn = sqlite3.connect(db)
    conn.execute("pragma journal_mode=wal")
    conn.execute("create table t(id integer primary key, b blob)")
    conn.execute("insert into t(b) values (randomblob(3000))")
    conn.commit()
    conn.close()
    child = None
    if mode != "none":
        url = f"gcs://{bucket}/db" if mode == "gcs" else f"file://{d}/replica"
        log = open(os.path.join(d, "walstream.log"), "w")
        child = subprocess.Popen([WALSTREAM, "replicate", db, url], env={**os.environ, "STORAGE_EMULATOR_HOST": host}, stdout=log, stderr=log)
        time.sleep(1)
    worst, worst_at, n, wal = write_beside_a_long_reader(db)
    if child:
        child.terminate()
        child.wait(timeout=60)
    if mode == "gcs":
        empty_bucket(host, bucket)
    shutil.rmtree(d)
    return worst, worst_at, n, wal


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--dir", default=tempfile.gettempdir())
    a = p.parse_args()
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    host = f"127.0.0.1:{port}"
    emulator = subprocess.Popen([FAKE_GCS, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-public-host", host, "-external-url", f"http://{host}", "-backend", "memory", "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://{host}/storage/v1/b", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        for run in range(a.runs):
            for mode in ["none", "file", "gcs"]:
                bucket = f"long-reader-{run}-{mode}"
                req = urllib.request.Request(f"http://{host}/storage/v1/b?project=p", data=json.dumps({"name": bucket}).encode(), headers={"Content-Type": "application/json"}, method="POST")
                urllib.request.urlopen(req).read()
                worst, worst_at, n, wal = one_run(a.dir, mode, host, bucket)
                label = {"none": "no replicator", "file": "walstream file://", "gcs": "walstream gcs://"}[mode]
                print(f"{label}: worst commit {worst * 1000:.1f} ms (at {worst_at:.2f} s), {n} commits, WAL {wal >> 20} MiB", flush=True)
    finally:
        emulator.terminate()


if __name__ == "__main__":
    main()
