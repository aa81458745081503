#!/usr/bin/env python3
"""The application's WAL under a writer of large transactions, with and without walstream.

The writer is the e2e test's (`replicate::large_transactions_back_to_back_still_let_the_wal_restart`):
10,000-row updates of a 60,000-row table back to back, `synchronous=NORMAL`, default
`wal_autocheckpoint`. Each BIN (a walstream binary, or `none` for the app alone) replicates to
a file:// replica in a fresh directory; the runs alternate between the BINs so that a slower
moment of the machine falls on all of them. Prints, per run, the WAL file's peak (SQLite never
shrinks it, so the peak is the largest WAL life) and the first life's size, then the medians.

    scripts/build-release.sh
    python3 scripts/measure-large-transactions.py none target/dist/walstream --runs 6 --secs 3

With --outage SIZE the replica is `gcs://` on a closed port (a store outage for the whole run)
and walstream runs with `-max-local-wal SIZE`; each run also prints the new generations by
reason and by how much the local shadow had passed the bound when each was started.
"""
import argparse
import collections
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import time


def run(binary, secs, outage=None):
    d = tempfile.mkdtemp(prefix="walstream-large-tx-")
    db = os.path.join(d, "app.db")
    c = sqlite3.connect(db, isolation_level=None)
    c.execute("PRAGMA journal_mode=wal")
    c.execute("PRAGMA synchronous=normal")
    c.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, body TEXT)")
    c.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 60000) "
        "INSERT INTO items (id, body) SELECT i, hex(randomblob(100)) FROM n"
    )
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    replicator = None
    if binary != "none":
        log = open(os.path.join(d, "walstream.log"), "w")
        replica = "file://" + os.path.join(d, "replica")
        env, extra = None, []
        if outage:
            # Port 1 refuses every connection: the store is down for the whole run.
            replica = "gcs://dead/db"
            env = dict(os.environ, STORAGE_EMULATOR_HOST="http://127.0.0.1:1")
            extra = ["-max-local-wal", outage]
        replicator = subprocess.Popen([binary, "replicate", *extra, db, replica], stdout=log, stderr=log, env=env)
        time.sleep(1.5)  # its first snapshot
    wal = db + "-wal"
    first_life, peak, commits, first_salt = 0, 0, 0, None
    started = time.time()
    while time.time() - started < secs:
        for first in range(1, 60001, 10000):
            c.execute("UPDATE items SET body = hex(randomblob(100)) WHERE id BETWEEN ? AND ?", (first, first + 9999))
            commits += 1
            size = os.path.getsize(wal) if os.path.exists(wal) else 0
            peak = max(peak, size)
            with open(wal, "rb") as f:
                salt = f.read(32)[16:24]
            first_salt = first_salt or salt
            if salt == first_salt:
                first_life = max(first_life, size)
    if replicator:
        replicator.terminate()
        # In an outage the final flush cannot ship: exit 8 says so, and is expected.
        if replicator.wait(timeout=30) not in ((0, 8) if outage else (0,)):
            raise SystemExit(f"{binary} exited {replicator.returncode}; its log is in {d}")
    c.close()
    generations = None
    if replicator and outage:
        text = open(os.path.join(d, "walstream.log")).read()
        reasons = collections.Counter(
            re.sub(r"\(\d+ bytes > \d+\)", "(...)", m) for m in re.findall(r'new generation.*?reason="([^"]*)"', text)
        )
        past = [int(u) - int(b) for u, b in re.findall(r"passed max-local-wal \((\d+) bytes > (\d+)\)", text)]
        generations = (dict(reasons), (min(past) >> 10, max(past) >> 10) if past else None)
    shutil.rmtree(d)
    return commits, peak, first_life, generations


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binaries", nargs="+", help="walstream binaries, or none for the app alone")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--secs", type=float, default=3.0)
    parser.add_argument("--outage", metavar="SIZE", help="replica down all run, with -max-local-wal SIZE")
    args = parser.parse_args()
    peaks = {b: [] for b in args.binaries}
    for n in range(args.runs):
        for binary in args.binaries:
            commits, peak, first_life, generations = run(binary, args.secs, args.outage)
            peaks[binary].append(peak)
            print(f"run {n + 1} {binary}: {commits} commits, WAL peak {peak >> 10} KiB, first life {first_life >> 10} KiB", flush=True)
            if generations:
                reasons, past = generations
                print(f"  new generations by reason: {reasons}; past the bound by {past} KiB (least, most)", flush=True)
    for binary, p in peaks.items():
        print(f"{binary}: WAL peak median {statistics.median(p) / 1024:.0f} KiB, range {min(p) >> 10}-{max(p) >> 10} KiB")


if __name__ == "__main__":
    main()
