#!/bin/sh
# One container, walstream as PID 1: restore if needed, then replicate while supervising the app.
set -eu
walstream restore -if-db-not-exists -if-replica-exists -o "$DB_PATH" "$REPLICA_URL"
exec walstream replicate -shutdown-timeout 8s -exec "python /app/app.py" "$DB_PATH" "$REPLICA_URL"
