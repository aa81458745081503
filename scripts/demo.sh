#!/usr/bin/env bash
# Replicates a sample database to a local file:// replica while an app writes to it, stops the
# replicator the way Cloud Run does (SIGTERM), restores the replica and compares. No cloud account.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p walstream-cli --bin walstream
bin=target/release/walstream
demo=.demo
rm -rf "$demo" && mkdir -p "$demo"
db="$demo/app.db" replica="file://$PWD/$demo/replica" restored="$demo/restored.db"

python3 - "$db" <<'PY'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
c.execute("PRAGMA journal_mode=wal")
c.execute("CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)")
c.commit()
PY

echo "== walstream replicate $db $replica"
"$bin" replicate "$db" "$replica" 2> "$demo/replicate.log" &
replicator=$!
trap 'kill $replicator 2>/dev/null || true' EXIT

python3 - "$db" <<'PY'
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1])
for batch in range(20):
    with c:
        c.executemany("INSERT INTO notes(body) VALUES (?)", [(f"note {batch}-{i} " + "x" * 200,) for i in range(500)])
    if batch % 5 == 4:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the app's own checkpoint keeps working
    time.sleep(0.05)
print("app wrote", c.execute("SELECT count(*) FROM notes").fetchone()[0], "rows")
PY

echo "== SIGTERM: walstream ships everything committed, then exits"
kill -TERM "$replicator"
wait "$replicator"
trap - EXIT
tail -n 3 "$demo/replicate.log"

echo "== walstream restore -o $restored $replica"
"$bin" restore -o "$restored" "$replica"

python3 - "$db" "$restored" <<'PY'
import sqlite3, sys
rows = [sqlite3.connect(p).execute("SELECT * FROM notes ORDER BY id").fetchall() for p in sys.argv[1:]]
check = sqlite3.connect(sys.argv[2]).execute("PRAGMA integrity_check").fetchone()[0]
assert rows[0] == rows[1], "restored database differs from the source"
print(f"restored {len(rows[1])} rows, identical to the source; integrity_check: {check}")
PY
echo "== replica layout"
find "$demo/replica" -type f | sort | head -n 8
