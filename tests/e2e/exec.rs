//! `replicate -exec`: the application runs under walstream, which passes signals on, exits
//! with the application's code, and always ships everything first.

use std::time::Duration;

use crate::harness::*;

/// An application in Python: commits `rows` one-row transactions to the database, then exits
/// with `code`, or with `code` = "wait", records that it is done and sleeps until signalled.
const APP: &str = r#"
import sqlite3, sys, time
db, rows, code, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
conn = sqlite3.connect(db, isolation_level=None)
conn.execute("PRAGMA journal_mode=wal")
conn.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
for i in range(rows):
    conn.execute("INSERT INTO items (body) VALUES (?)", ("row %d " % i + "x" * 200,))
conn.close()
if code == "wait":
    open(marker, "w").write("done")
    time.sleep(120)
sys.exit(int(code))
"#;

fn start_app(scratch: &Scratch, rows: usize, code: &str) -> Replicator {
    let script = scratch.path("app.py");
    std::fs::write(&script, APP).unwrap();
    let command = format!(
        "python3 {} {} {rows} {code} {}",
        script.display(),
        scratch.db().display(),
        scratch.path("app.done").display()
    );
    Replicator::start_with_args(
        &scratch.db(),
        &[scratch.replica_url()],
        scratch.path("replicate.log"),
        &[],
        &["-exec", &command],
    )
}

#[test]
fn exits_with_the_apps_code_after_shipping_everything() {
    for code in [0, 3] {
        let scratch = Scratch::new();
        let replicator = start_app(&scratch, 400, &code.to_string());
        let log = scratch.path("replicate.log");
        let status = replicator.wait_for_exit();
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(status.code(), Some(code), "{text}");
        assert!(
            text.contains("everything committed was shipped"),
            "the final flush runs even when the app fails:\n{text}"
        );
        scratch.assert_restores_source();
        assert_eq!(App::open(&scratch.db()).count(), 400);
    }
}

#[test]
fn sigterm_is_passed_on_to_the_app_and_everything_is_shipped() {
    let scratch = Scratch::new();
    let replicator = start_app(&scratch, 300, "wait");
    wait_until(Duration::from_secs(30), "the app to commit its rows", || scratch.path("app.done").exists());
    replicator.signal(libc::SIGTERM);
    let log = scratch.path("replicate.log");
    let status = replicator.wait_for_exit();
    let text = std::fs::read_to_string(&log).unwrap();
    // Ended by the signal walstream passed on: a requested shutdown, so 0.
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(text.contains("sending signal to -exec command"), "{text}");
    scratch.assert_restores_source();
}
