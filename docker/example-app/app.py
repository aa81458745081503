"""A tiny app that keeps its state in SQLite: every POST / adds a row, GET / returns the count.

It is the example application of the compose and Cloud Run files, and the tests run it as the
"app" container. Standard library only. Follows Litestream's advice for apps: WAL mode, a busy
timeout, and no long-lived write transactions.
"""
import http.server
import os
import signal
import sqlite3
import sys

DB_PATH = os.environ.get("DB_PATH", "/data/app.db")
PORT = int(os.environ.get("PORT", "8080"))


def connect():
    conn = sqlite3.connect(DB_PATH, timeout=10, isolation_level=None)
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("CREATE TABLE IF NOT EXISTS visits (id INTEGER PRIMARY KEY, at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP, body TEXT)")
    return conn


class Handler(http.server.BaseHTTPRequestHandler):
    def respond(self, count):
        body = f"{count}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.respond(self.server.db.execute("SELECT count(*) FROM visits").fetchone()[0])

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        text = self.rfile.read(length).decode(errors="replace") if length else ""
        self.server.db.execute("INSERT INTO visits (body) VALUES (?)", (text,))
        self.do_GET()

    def log_message(self, *args):
        pass


def main():
    server = http.server.HTTPServer(("0.0.0.0", PORT), Handler)
    server.db = connect()
    # SIGTERM (Cloud Run scale-down, docker stop, walstream -exec passing it on): close cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"listening on :{PORT}, database {DB_PATH}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.db.close()


if __name__ == "__main__":
    main()
